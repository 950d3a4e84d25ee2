"""The two markers of ``--dist poolaware``: their names, and what one item carries."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

SERIAL_MARKER: Final = "serial_only"
PARALLEL_MARKER: Final = "parallel_safe"


@dataclass(frozen=True, slots=True)
class Markers:
    """Which of the plugin's markers one collected item carries (its classes' and
    modules' included)."""

    serial: bool = False
    parallel: bool = False

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
