"""The two markers of ``--dist poolaware``, xdist's ``xdist_group``, and what one item
carries."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

SERIAL_MARKER: Final = "serial_only"
PARALLEL_MARKER: Final = "parallel_safe"
#: pytest-xdist's own marker (``--dist loadgroup``): tests of one name run on one worker.
GROUP_MARKER: Final = "xdist_group"
#: The name of an ``xdist_group`` mark given none, as xdist names it.
DEFAULT_GROUP_NAME: Final = "default"


@dataclass(frozen=True, slots=True)
class Markers:
    """Which of the plugin's markers one collected item carries (its classes' and
    modules' included), and its ``xdist_group``."""

    serial: bool = False
    parallel: bool = False
    #: The item's ``xdist_group`` name ("": none), as ``--dist loadgroup`` names it
    #: (``group_name``). Not ``core.ItemSpec.group``, which is the item's module.
    xdist_group: str = ""

    @property
    def both(self) -> bool:
        """Both at once contradict each other: a usage error (``conflict_message``)."""
        return self.serial and self.parallel

    @property
    def names(self) -> list[str]:
        """The marker names, as the JSON report lists them."""
        return [
            name
            for name, present in ((SERIAL_MARKER, self.serial), (PARALLEL_MARKER, self.parallel))
            if present
        ]


#: An item with neither marker (also what the controller assumes when none were reported).
UNMARKED: Final = Markers()


def conflict_message(nodeids: Iterable[str]) -> str:
    """The usage error for tests carrying both markers."""
    return f"tests marked both {SERIAL_MARKER} and {PARALLEL_MARKER}: " + ", ".join(nodeids)


def group_name(names: Iterable[object]) -> str:
    """The group of an item carrying ``xdist_group`` marks of these names (its classes'
    and modules' included), as pytest-xdist's ``loadgroup`` combines them: the distinct
    names, sorted, joined with "_" ("" for none)."""
    return "_".join(sorted({str(name) for name in names}))


def mark_group_name(args: tuple[object, ...], kwargs: Mapping[str, object]) -> object:
    """The name one ``xdist_group`` mark gives: its first argument, else ``name=``."""
    return args[0] if args else kwargs.get("name", DEFAULT_GROUP_NAME)
