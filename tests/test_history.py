"""Learned needs survive contention (a jump is confirmed before it is trusted) and
filtered runs (only a run of the whole suite says which tests are gone)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_poolaware.planning.history import History, Measure, Selection, covers

NODE = "test_x.py::test_x"


def test_a_first_clean_sighting_is_trusted() -> None:
    history = History()
    history.record(NODE, 8, 1.0)
    assert history.get(NODE) == Measure(8, 1.0)


def test_a_need_that_goes_down_is_trusted_at_once() -> None:
    history = History({NODE: Measure(8, 1.0)})
    history.record(NODE, 3, 0.5, contended=True)
    assert history.get(NODE) == Measure(3, 0.5)


def test_a_jump_waits_for_a_later_run_and_is_trusted_at_the_smaller_sighting() -> None:
    history = History({NODE: Measure(8, 1.0)})
    history.record(NODE, 14, 1.0)
    assert history.get(NODE) == Measure(8, 1.0, pending=14)
    history.record(NODE, 10, 1.0)
    assert history.get(NODE) == Measure(10, 1.0)


def test_a_contended_attempt_never_raises_a_trusted_need() -> None:
    history = History({NODE: Measure(8, 1.0)})
    for seen in (14, 15, 14):
        history.record(NODE, seen, 1.0, contended=True)
        assert history.get(NODE) == Measure(8, 1.0, pending=14)
    history.record(NODE, 8, 1.0)  # then a run alone
    assert history.get(NODE) == Measure(8, 1.0)


def test_a_first_sighting_under_contention_is_confirmed_by_the_next_run() -> None:
    history = History()
    history.record(NODE, 15, 1.0, contended=True)
    assert history.get(NODE) == Measure(None, 1.0, pending=15)
    history.record(NODE, 1, 0.1)
    assert history.get(NODE) == Measure(1, 0.1)


def test_pending_sightings_survive_the_cache() -> None:
    history = History({NODE: Measure(8, 1.0, pending=14), "b": Measure(None, 2.0, pending=3)})
    data = json.loads(json.dumps(history.to_json()))
    assert data["tests"] == {NODE: [8, 1.0, 14], "b": [None, 2.0, 3]}
    again = History.from_json(data)
    assert again.get(NODE) == Measure(8, 1.0, pending=14)
    assert again.get("b") == Measure(None, 2.0, pending=3)
    assert not again.problems


def test_malformed_pending_entries_are_dropped() -> None:
    data = {"schema": 1, "tests": {"a": [None, 1.0], "b": [1, 1.0, -2], "c": [1, 1.0, 2, 3]}}
    history = History.from_json(data)
    assert len(history) == 0
    assert history.problems == ["ignored 3 malformed entries in the learned data"]


@given(
    st.integers(0, 20),
    st.lists(st.tuples(st.integers(0, 40), st.booleans()), max_size=12),
)
def test_contention_alone_never_lifts_a_need_above_what_clean_runs_saw(
    clean: int, sightings: list[tuple[int, bool]]
) -> None:
    history = History({NODE: Measure(clean, 1.0)})
    ceiling = clean
    for need, contended in sightings:
        history.record(NODE, need, 1.0, contended=contended)
        if not contended:
            ceiling = max(ceiling, need)
        measure = history.get(NODE)
        assert measure is not None
        assert measure.need is not None
        assert measure.need <= ceiling


ROOT = Path("/repo")
WHOLE = Selection((ROOT,), (ROOT,))
KEPT = {"kept.py::test_a": Measure(1, 0.5), "kept.py::test_b": Measure(2, 1.0)}
GONE = {"deleted.py::test_c": Measure(3, 1.5)}


def forget(history: History, collection: list[str], selection: Selection) -> int:
    """``forget_missing`` as the scheduler calls it, with ``deleted.py`` gone from disk."""
    return history.forget_missing(
        collection,
        whole_suite=selection.whole_suite,
        file_exists=lambda path: path != "deleted.py",
    )


@pytest.mark.parametrize(
    "narrowed",
    [
        Selection((ROOT / "tests" / "test_x.py",), (ROOT,)),
        Selection((ROOT / "kept.py",), (ROOT,), node_ids=True),
        Selection((ROOT,), (ROOT,), last_failed=True),
        Selection((ROOT,), (ROOT,), keyword="fast"),
        Selection((ROOT,), (ROOT,), markexpr="not slow"),
        Selection((ROOT,), (ROOT,), deselected=1),
        Selection((ROOT,), (ROOT,), uncollected=1),
        Selection((ROOT / "tests",), (ROOT / "tests", ROOT / "docs")),
    ],
    ids=["path", "node-id", "lf", "-k", "-m", "deselected", "uncollected", "one-testpath"],
)
def test_a_filtered_run_keeps_what_it_did_not_collect_unless_its_file_is_gone(
    narrowed: Selection,
) -> None:
    history = History({**KEPT, **GONE})
    assert not narrowed.whole_suite
    assert forget(history, ["kept.py::test_a"], narrowed) == 1
    assert {nodeid for nodeid in KEPT if history.get(nodeid)} == set(KEPT)
    assert history.get("deleted.py::test_c") is None


@pytest.mark.parametrize(
    "whole",
    [
        WHOLE,
        Selection((ROOT / "tests", ROOT / "docs"), (ROOT / "tests", ROOT / "docs")),
        Selection((Path("/"),), (ROOT,)),  # run from above the rootdir
        Selection((ROOT / "tests",), (ROOT / "tests" / "a", ROOT / "tests" / "b")),
    ],
    ids=["rootdir", "testpaths", "above", "around-testpaths"],
)
def test_a_run_of_the_whole_suite_forgets_every_test_it_did_not_collect(
    whole: Selection,
) -> None:
    history = History({**KEPT, **GONE})
    assert whole.whole_suite
    assert forget(history, ["kept.py::test_a"], whole) == 2
    assert len(history) == 1
    assert history.get("kept.py::test_a") == KEPT["kept.py::test_a"]


def test_each_file_is_looked_for_once() -> None:
    looked: list[str] = []

    def exists(path: str) -> bool:
        looked.append(path)
        return True

    history = History({f"kept.py::test_{n}": Measure(1, 0.1) for n in range(50)})
    history.forget_missing([], whole_suite=False, file_exists=exists)
    assert looked == ["kept.py"]
    assert len(history) == 50


paths = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map(
    lambda parts: ROOT.joinpath(*parts)
)


@given(st.lists(paths, min_size=1, max_size=3), st.lists(paths, max_size=3))
def test_paths_cover_the_suite_only_when_each_root_lies_within_one(
    roots: list[Path], arguments: list[Path]
) -> None:
    """Adding an argument never uncovers a root; a root's own path covers it."""
    covered = covers(arguments, roots)
    assert covers([*arguments, ROOT], roots)
    assert covers(roots, roots)
    assert covers([*arguments, *roots[:1]], roots) >= covered
    if covered:
        assert all(any(root.is_relative_to(arg) for arg in arguments) for root in roots)


def test_a_teams_file_comes_first_and_the_cache_fills_in_what_it_lacks() -> None:
    shared = History({"a.py::test": Measure(4, 2.0)})
    cached = History({"a.py::test": Measure(1, 0.5), "b.py::test": Measure(2, 1.0)})
    shared.problems.append("from the file")
    cached.problems.append("from the cache")
    merged = shared.filled_from(cached)
    assert merged.get("a.py::test") == Measure(4, 2.0)
    assert merged.get("b.py::test") == Measure(2, 1.0)
    assert merged.problems == ["from the file", "from the cache"]


def test_the_file_written_reads_back_sorted_one_test_a_line(tmp_path: Path) -> None:
    path = tmp_path / "history.json"
    entries = {
        "tests/b.py::test[x-1]": Measure(2, 1.25),
        "tests/a.py::test_ä": Measure(None, 0.5, pending=9),
        "tests/a.py::test": Measure(0, 0.0),
    }
    History(entries).write(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == [
        "{",
        '  "schema": 1,',
        '  "tests": {',
        '    "tests/a.py::test": [0, 0.0],',
        '    "tests/a.py::test_\\u00e4": [null, 0.5, 9],',
        '    "tests/b.py::test[x-1]": [2, 1.25]',
        "  }",
        "}",
    ]
    again = History.read(path)
    assert {nodeid: again.get(nodeid) for nodeid in entries} == entries
    assert not again.problems
    History().write(path)
    assert json.loads(path.read_text()) == {"schema": 1, "tests": {}}
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "is not valid JSON; starting cold"),
        (b"\xff\xfe\x00garbage", "is not UTF-8; starting cold"),
        (b'{"schema": 99, "tests": {}}', "has an unknown format; starting cold"),
        (b'{"schema": 1, "tests": {"a.py::t": [1, "slow"]}}', "ignored 1 malformed entries"),
    ],
)
def test_a_corrupt_file_is_a_problem_named_by_its_path_never_an_error(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = tmp_path / "history.json"
    path.write_bytes(content)
    history = History.read(path)
    assert len(history) == 0
    assert len(history.problems) == 1
    assert problem in history.problems[0]
    assert str(path) in history.problems[0]


def test_a_missing_file_is_nothing_learned_yet(tmp_path: Path) -> None:
    history = History.read(tmp_path / "absent.json")
    assert (len(history), history.problems) == (0, [])
