"""Replacing a driver's function by a wrapper, once, and putting it back.

A hook goes where the driver itself looks a name up when it connects or closes: a
method in a class's ``__dict__`` (found through the MRO at call time) or a function on
its module (found through the module at call time). Each replacement is remembered in
an undo list, so removing the hooks restores exactly what was there; a name already
hooked (another agent in this process) is left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

#: Set on each wrapper: what it replaced (how a second agent sees the name is hooked).
_ORIGINAL: Final = "__poolaware_original__"


def patch(owner: Any, name: str, wrapper: Any, undo: list[Callable[[], None]]) -> None:
    """Replace ``owner.name`` by ``wrapper`` (once), remembering how to put it back."""
    current = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    if getattr(unwrap(current), _ORIGINAL, None) is not None:
        return  # already hooked (another agent in this process)
    setattr(unwrap(wrapper), _ORIGINAL, current)
    setattr(owner, name, wrapper)
    undo.append(lambda: setattr(owner, name, current))


def unwrap(obj: Any) -> Any:
    """The function inside a classmethod or staticmethod (where the marker is kept)."""
    return obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj


def definer(cls: type, name: str) -> type:
    """The class in ``cls``'s MRO that defines ``name`` (where the hook must go)."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass
    raise AttributeError(f"{cls.__qualname__}.{name}")
