"""The messages between controller and workers: named fields, one version, what execnet carries."""

from __future__ import annotations

import dataclasses
import json

import execnet
import pytest
from inner import TWO_TESTS, run

from pytest_poolaware.planning.core import Answer
from pytest_poolaware.shared.markers import Markers, group_name, mark_group_name
from pytest_poolaware.shared.protocol import (
    KIND,
    PROTOCOL_VERSION,
    VERSION,
    Collected,
    ControllerMessage,
    Counts,
    Goes,
    ItemMeasures,
    Note,
    ProtocolError,
    ReleaseIdle,
    RequestAnswer,
    RoomRequest,
    ServerPids,
    WorkerMessage,
    WorkerSettings,
    decode,
)

EVERY_KIND: list[WorkerMessage | ControllerMessage] = [
    Collected(
        (Markers(), Markers(serial=True), Markers(parallel=True), Markers(True, True)),
        ("t.py::test_both",),
        deselected=3,
        uncollected=1,
    ),
    Counts(open=3, idle=1, released=True, version=17),
    RoomRequest(request=4, want=None, item=2),
    RoomRequest(request=5, want=6, item=0),
    RoomRequest(request=6, want=None, item=1, background=True),
    Note("waited 30s for connection budget; connecting anyway"),
    Goes((0, 1, 5)),
    RequestAnswer(7, Answer.REFUSED),
    ReleaseIdle(),
    ServerPids(12.5, (101, 202)),
]

MEASURES = ItemMeasures(
    need=4,
    peak_open=5,
    duration=1.25,
    waited=0.5,
    start=100.0,
    end=101.75,
    rerun="the server refused a connection",
    open=2,
    idle=2,
    version=9,
    waits=((100.25, 100.75),),
    drivers=("asyncpg", "psycopg"),
    leaks=1,
    go_waited=0.125,
    gate_waited=0.25,
)


@pytest.mark.parametrize("message", EVERY_KIND, ids=lambda m: type(m).__name__)
def test_every_message_survives_execnet_serialization(
    message: WorkerMessage | ControllerMessage,
) -> None:
    wire = execnet.loads(execnet.dumps(message.to_wire()))
    assert wire[KIND] == message.kind
    assert wire[VERSION] == PROTOCOL_VERSION
    assert decode(wire) == message


def test_every_kind_is_registered_once() -> None:
    kinds = [type(m).kind for m in EVERY_KIND]
    assert len(set(kinds)) == len({type(m) for m in EVERY_KIND})


def test_fields_are_read_by_name_not_position() -> None:
    wire = {"version": 3, "released": False, "idle": 2, "open": 5, VERSION: 1, KIND: "counts"}
    assert decode(wire) == Counts(open=5, idle=2, released=False, version=3)


def test_added_fields_are_ignored_and_missing_ones_take_defaults() -> None:
    """Fields may be added without a new version: old readers skip them, new readers
    fill in what an old writer did not send."""
    newer = {**Counts(1, 0).to_wire(), "backend_pids": [123, 456]}
    assert decode(newer) == Counts(1, 0)
    older = {KIND: "request", VERSION: PROTOCOL_VERSION, "request": 3}
    assert decode(older) == RoomRequest(3, want=None, item=-1)


def test_the_budget_key_an_earlier_worker_sends_is_ignored() -> None:
    """Earlier workers sent ``budget`` (always the run's own, ""): dropping the field
    needed no new version, as their messages still read the same."""
    counts = {**Counts(2, 1, version=5).to_wire(), "budget": ""}
    assert decode(counts) == Counts(2, 1, version=5)
    request = {**RoomRequest(4, want=None, item=2).to_wire(), "budget": ""}
    assert decode(request) == RoomRequest(4, want=None, item=2)


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (("counts", 1, 0, False, 0), "not a pytest-poolaware message"),
        ({KIND: "counts", VERSION: 2, "open": 1, "idle": 0}, "protocol version 2"),
        ({KIND: "hello", VERSION: PROTOCOL_VERSION}, "unknown message kind 'hello'"),
        ({KIND: "counts", VERSION: PROTOCOL_VERSION, "open": 1}, "malformed 'counts'"),
        ({KIND: "grant", VERSION: PROTOCOL_VERSION, "request": 1, "answer": "x"}, "malformed"),
    ],
)
def test_what_is_not_a_message_of_ours_is_a_protocol_error(wire: object, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode(wire)


def test_markers_travel_as_indices_and_come_back_per_item() -> None:
    markers = tuple(Markers(serial=i % 3 == 0, parallel=i % 5 == 0) for i in range(30))
    wire = Collected(markers).to_wire()
    assert wire["serial_only"] == list(range(0, 30, 3))
    assert wire["parallel_safe"] == list(range(0, 30, 5))
    assert decode(wire) == Collected(markers)


def test_xdist_groups_travel_as_indices_by_name_and_come_back_per_item() -> None:
    markers = tuple(Markers(xdist_group=["", "db", "cache"][i % 3]) for i in range(9))
    wire = execnet.loads(execnet.dumps(Collected(markers).to_wire()))
    assert wire["xdist_group"] == {"db": [1, 4, 7], "cache": [2, 5, 8]}
    assert decode(wire) == Collected(markers)


def test_markers_from_a_worker_that_sends_no_groups_have_none() -> None:
    """A field added compatibly: an earlier worker's ``Collected`` still decodes."""
    markers = (Markers(serial=True), Markers())
    older = {k: v for k, v in Collected(markers).to_wire().items() if k != "xdist_group"}
    assert decode(older) == Collected(markers)


def test_a_worker_that_sends_no_selection_counts_narrowed_nothing() -> None:
    """Fields added compatibly: an earlier worker's ``Collected`` says nothing was left
    out of its collection."""
    sent = Collected((Markers(),), deselected=2, uncollected=1).to_wire()
    older = {k: v for k, v in sent.items() if k not in ("deselected", "uncollected")}
    assert decode(sent) == Collected((Markers(),), deselected=2, uncollected=1)
    assert decode(older) == Collected((Markers(),))


@pytest.mark.parametrize(
    ("marks", "name"),
    [
        ([(("db",), {})], "db"),
        ([((), {"name": "db"})], "db"),
        ([((), {})], "default"),
        ([(("b",), {}), ((), {"name": "a"}), (("b",), {})], "a_b"),
        ([((7,), {})], "7"),
        ([], ""),
    ],
)
def test_several_xdist_group_marks_combine_as_loadgroup_combines_them(
    marks: list[tuple[tuple[object, ...], dict[str, object]]], name: str
) -> None:
    """pytest-xdist's ``remote.py``: each mark's first argument, else ``name=``, else
    "default"; the distinct names sorted and joined with "_"."""
    assert group_name(mark_group_name(args, kwargs) for args, kwargs in marks) == name


def test_item_measures_travel_by_field_name() -> None:
    data = MEASURES.to_wire()
    assert isinstance(data, str)
    assert json.loads(data) == json.loads(json.dumps(dataclasses.asdict(MEASURES)))
    reordered = json.dumps(dict(reversed(list(json.loads(data).items()))))
    assert ItemMeasures.from_wire(reordered) == MEASURES
    with pytest.raises(ProtocolError, match="malformed item measures"):
        ItemMeasures.from_wire(json.dumps([4, 5, 1.25]))


def test_item_measures_from_a_worker_that_sends_no_waits_have_none() -> None:
    older = {k: v for k, v in json.loads(MEASURES.to_wire()).items() if k != "waits"}
    assert ItemMeasures.from_wire(json.dumps(older)) == dataclasses.replace(MEASURES, waits=())


def test_worker_settings_carry_the_protocol_version() -> None:
    settings = WorkerSettings(budget=15, gate_timeout=30.0, retry_on_limit=True, fast_exit=False)
    wire = execnet.loads(execnet.dumps(settings.to_wire()))
    assert WorkerSettings.from_wire(wire) == settings
    with pytest.raises(ProtocolError, match="install the same pytest-poolaware on both"):
        WorkerSettings.from_wire({**wire, VERSION: PROTOCOL_VERSION + 1})


#: An inner conftest making every worker speak another protocol version than its controller.
OTHER_VERSION_CONFTEST = """
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    import pytest_poolaware.shared.protocol as protocol

    protocol.PROTOCOL_VERSION += 1
"""


def test_a_worker_of_another_protocol_version_says_so(pytester: pytest.Pytester) -> None:
    """It refuses to start, naming both versions; the controller neither hangs nor fails
    inside xdist on a worker that never became ready."""
    pytester.makeconftest(OTHER_VERSION_CONFTEST)
    pytester.makepyfile(TWO_TESTS)
    result = run(pytester, "-n", "2", "--dist", "poolaware", "--max-worker-restart", "1")
    output = result.stdout.str() + result.stderr.str()
    assert (
        f"the controller speaks pytest-poolaware protocol {PROTOCOL_VERSION}, this worker "
        f"{PROTOCOL_VERSION + 1}: install the same pytest-poolaware on both"
    ) in output
    assert "INTERNALERROR" not in output
    result.stdout.fnmatch_lines(["*maximum crashed workers reached: 1*"])


def test_what_is_learned_of_a_test_leaves_out_its_time_at_the_connect_gate() -> None:
    """A test that waited for room runs that much faster alone: its net duration is what
    the next run plans with."""
    assert MEASURES.net_duration == 1.0
    assert dataclasses.replace(MEASURES, gate_waited=2.0).net_duration == 0.0
