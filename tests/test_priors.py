"""Priors: a test not measured yet is planned with the largest need measured among its
nearest relatives (its function's parametrizations, its class, its module)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_poolaware.planning.priors import Priors, family


@pytest.mark.parametrize(
    ("nodeid", "levels"),
    [
        ("a.py::test", ("a.py::test", "a.py")),
        ("t/a.py::test[1-x]", ("t/a.py::test", "t/a.py")),
        ("a.py::C::test[p]", ("a.py::C::test", "a.py::C", "a.py")),
        (
            "a.py::Outer::Inner::test",
            ("a.py::Outer::Inner::test", "a.py::Outer::Inner", "a.py::Outer", "a.py"),
        ),
        # Parameter ids may hold "::" and "[", a directory "[": neither is a level.
        ("d[1]/a.py::test[x::y[z]]", ("d[1]/a.py::test", "d[1]/a.py")),
        ("a.py", ("a.py",)),
    ],
)
def test_a_tests_relatives_are_its_function_its_classes_and_its_module(
    nodeid: str, levels: tuple[str, ...]
) -> None:
    assert family(nodeid) == levels


def test_the_nearest_level_with_a_measure_decides_with_its_largest() -> None:
    nodeids = [
        "a.py::C::test[0]",
        "a.py::C::test[1]",
        "a.py::C::other",
        "a.py::free",
        "a.py::C::test[2]",
        "b.py::test",
    ]
    priors = Priors([family(nodeid) for nodeid in nodeids])
    assert [priors.need(i) for i in range(len(nodeids))] == [None] * len(nodeids)
    priors.learn(3, 9)  # module level only
    priors.learn(2, 1)  # class level
    priors.learn(0, 4)
    priors.learn(1, 2)  # the function's largest stays 4
    assert [priors.need(i) for i in range(len(nodeids))] == [4, 4, 1, 9, 4, None]


NAMES = st.sampled_from(["a.py", "b.py"]).flatmap(
    lambda module: st.tuples(
        st.just(module), st.sampled_from(["", "C::", "D::"]), st.sampled_from(["f", "g"])
    )
)


@given(st.lists(st.tuples(NAMES, st.integers(0, 3), st.integers(0, 20)), min_size=1, max_size=30))
def test_a_prior_is_the_largest_need_of_the_relatives_sharing_the_nearest_level(
    measures: list[tuple[tuple[str, str, str], int, int]],
) -> None:
    """Against a direct reading of the rule: for every test, find the nearest level any
    measured test shares with it; the prior is the largest need measured there."""
    nodeids = [
        f"{module}::{cls}{function}[{param}]" for (module, cls, function), param, _ in measures
    ]
    families = [family(nodeid) for nodeid in nodeids]
    priors = Priors(families)
    measured = measures[: len(measures) // 2]
    for index, (_, _, need) in enumerate(measured):
        priors.learn(index, need)
    for index, levels in enumerate(families):
        expected = None
        for level in levels:
            sharing = [need for j, (_, _, need) in enumerate(measured) if level in families[j]]
            if sharing:
                expected = max(sharing)
                break
        assert priors.need(index) == expected
