"""Priors: the need a test not measured yet is planned with, from its relatives.

A test's relatives share its code: the other parametrizations of its function first,
then the tests of its class (of each enclosing class, innermost first), then those of
its module. A test never measured is planned with the largest need measured at the
nearest level that has one (by an earlier run, or earlier in this run), so a family of
heavy tests stops trickling through the connect gate one connection at a time once one
of them is measured. The largest, not the mean: a guess too high costs parallelism,
one too low costs waits at the gate and refusals. Pure: no pytest, no xdist.
"""

from __future__ import annotations

from collections.abc import Sequence

#: Separates a node id's parts (``file.py::Class::test``), as pytest writes them.
NODE_SEPARATOR = "::"


def family(nodeid: str) -> tuple[str, ...]:
    """The levels of a test's relatives, nearest first: its function (parameters
    stripped), each enclosing class, its module. ``a.py::C::test[1]`` is
    ``("a.py::C::test", "a.py::C", "a.py")``."""
    module, separated, rest = nodeid.partition(NODE_SEPARATOR)
    # Class and function names hold neither "[" nor "::"; parameter ids may hold both.
    names = rest.split("[", 1)[0].split(NODE_SEPARATOR) if separated else []
    return (
        *(NODE_SEPARATOR.join([module, *names[:end]]) for end in range(len(names), 0, -1)),
        module,
    )


class Priors:
    """The largest need measured at each level, for the items' ``family`` levels."""

    def __init__(self, families: Sequence[Sequence[str]] = ()) -> None:
        self._families = families
        self._largest: dict[str, int] = {}

    def learn(self, index: int, need: int) -> None:
        """Item ``index`` was measured (or learned) to need ``need``."""
        largest = self._largest
        for level in self._families[index]:
            if largest.get(level, -1) < need:
                largest[level] = need

    def need(self, index: int) -> int | None:
        """The largest need measured at item ``index``'s nearest level that has one."""
        for level in self._families[index]:
            need = self._largest.get(level)
            if need is not None:
                return need
        return None
