"""The messages between the controller and its workers, one typed class per kind.

Three routes (``docs/design.md``, "Protocol"):

* ``WorkerSettings`` travels once, in ``workerinput``, beside the side channel;
* the side channel (``link``) carries ``Collected``, ``Counts``, ``RoomRequest``,
  ``ServerSeen``, ``Note`` and ``OpenedOutsideTests`` from a worker, ``Goes``,
  ``RequestAnswer``, ``ReleaseIdle``, ``ServerPids`` and ``RoomKnown`` from the controller;
* ``ItemMeasures`` rides on an item's last report, on xdist's own channel.

On the wire a message is a dict of plain values that execnet can serialize: its fields
by name, ``kind`` and the protocol version ``v``. A reader ignores fields it does not
know and lets missing fields take their defaults, so fields may be added without a new
version, and a field may be dropped that every writer only ever sent at its default (the
reader fills in the same); anything else that changes (a field's meaning, any other field
removed) needs one.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Final, TypeVar

from pytest_poolaware.shared.markers import GROUP_MARKER, PARALLEL_MARKER, SERIAL_MARKER, Markers
from pytest_poolaware.shared.options import DEFAULT_POOL_TIMEOUT, GO_TIMEOUT_GATES

#: Bumped for any change a reader of the previous version would misread.
PROTOCOL_VERSION: Final = 1
KIND: Final = "kind"
VERSION: Final = "v"

Wire = dict[str, Any]


class Answer(enum.Enum):
    """How a blocked request is answered."""

    GRANTED = "granted"
    #: Let past the budget: the test cannot fit even with the run to itself.
    OVER_BUDGET = "over_budget"
    #: Refused to break a deadlock: every worker holding connections was waiting for
    #: more. The test fails on a connection-limit error and the worker reruns it alone.
    REFUSED = "refused"


class ProtocolError(ValueError):
    """A message that is not one of ours, or of another protocol version."""


class _Plain:
    """A message whose fields are plain values: on the wire, the fields by name."""

    kind: ClassVar[str]
    #: Field names, filled in by ``_message`` once the dataclass exists.
    _names: ClassVar[tuple[str, ...]] = ()

    def to_wire(self) -> Wire:
        wire: Wire = {KIND: self.kind, VERSION: PROTOCOL_VERSION}
        for name in self._names:
            wire[name] = getattr(self, name)
        return wire

    @classmethod
    def from_wire(cls: type[_P], wire: Mapping[str, Any]) -> _P:
        return cls(**{name: wire[name] for name in cls._names if name in wire})


_P = TypeVar("_P", bound=_Plain)
_KINDS: dict[str, Callable[[Mapping[str, Any]], _Plain]] = {}


def _message(cls: type[_P]) -> type[_P]:
    """Register a message class under its ``kind`` (after ``@dataclass`` made its fields)."""
    cls._names = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
    assert cls.kind not in _KINDS, cls.kind
    _KINDS[cls.kind] = cls.from_wire
    return cls


# -- worker -> controller --------------------------------------------------------------------


@_message
@dataclass(frozen=True, slots=True)
class Collected(_Plain):
    """Once, after collection, before xdist's own ``collectionfinish``: every item's markers
    (its ``xdist_group`` included) in collection order, the node ids carrying both, and
    what kept the collection short of what was found (so the tests not collected may
    still exist: ``planning.history.Selection``)."""

    kind: ClassVar[str] = "collected"
    markers: tuple[Markers, ...]
    conflicts: tuple[str, ...] = ()
    #: Items collected, then left out of the run (deselected, or dropped by a plugin).
    deselected: int = 0
    #: Files or packages whose tests were not collected: a collection error, or skipped
    #: whole (``pytest.importorskip``).
    uncollected: int = 0

    def to_wire(self) -> Wire:
        """Markers as the indices carrying each: a collection may hold thousands of items."""
        return {
            KIND: self.kind,
            VERSION: PROTOCOL_VERSION,
            "items": len(self.markers),
            SERIAL_MARKER: [i for i, m in enumerate(self.markers) if m.serial],
            PARALLEL_MARKER: [i for i, m in enumerate(self.markers) if m.parallel],
            GROUP_MARKER: _indices_by_group(self.markers),
            "conflicts": list(self.conflicts),
            "deselected": self.deselected,
            "uncollected": self.uncollected,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Collected:
        serial = set(wire.get(SERIAL_MARKER, ()))
        parallel = set(wire.get(PARALLEL_MARKER, ()))
        # Added compatibly: a worker of an earlier release sends no groups.
        groups = {
            int(index): str(name)
            for name, indices in wire.get(GROUP_MARKER, {}).items()
            for index in indices
        }
        markers = tuple(
            Markers(i in serial, i in parallel, groups.get(i, ""))
            for i in range(int(wire["items"]))
        )
        return cls(
            markers,
            tuple(str(c) for c in wire.get("conflicts", ())),
            # Added compatibly: an earlier worker sends neither (read as nothing left out).
            int(wire.get("deselected", 0)),
            int(wire.get("uncollected", 0)),
        )


def _indices_by_group(markers: tuple[Markers, ...]) -> dict[str, list[int]]:
    """The indices of the items of each ``xdist_group``, by name."""
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(markers):
        if item.xdist_group:
            groups.setdefault(item.xdist_group, []).append(index)
    return groups


@_message
@dataclass(frozen=True, slots=True)
class Counts(_Plain):
    """The worker's live connections, each time its open count changes."""

    kind: ClassVar[str] = "counts"
    open: int
    idle: int
    #: Sent in answer to ``ReleaseIdle``: what is idle now could not be given back.
    released: bool = False
    #: Grows with every change; orders these counts against those on item reports.
    version: int = 0


@_message
@dataclass(frozen=True, slots=True)
class RoomRequest(_Plain):
    """Item ``item`` is blocked until it may hold ``want`` connections (None: one more)."""

    kind: ClassVar[str] = "request"
    request: int  # unique per worker; the answer names it
    want: int | None = None
    item: int = -1  # -1: outside any item
    #: Opened by a pool in its own thread or task: delayed until there is room, never
    #: refused (the test would only see the pool time out).
    background: bool = False


@_message
@dataclass(frozen=True, slots=True)
class ServerSeen(_Plain):
    """The worker opened its first connection to this server as this login (sent only
    when the controller asked to learn the server: no DSN was given).

    The password travels only so that the controller can open the plugin's own
    connection as the same login; it is left out of ``repr`` and never shown.
    """

    kind: ClassVar[str] = "server"
    host: str
    port: int
    dbname: str
    user: str
    password: str | None = field(default=None, repr=False)
    driver: str = ""
    #: The connection's backend pid: one of the run's, not another client's.
    pid: int = 0

    @property
    def key(self) -> tuple[str, int, str, str]:
        """The server and login, without the password."""
        return (self.host, self.port, self.dbname, self.user)

    def where(self) -> str:
        """``user@host:port/dbname``, for notes."""
        return f"{self.user}@{self.host}:{self.port}/{self.dbname}"


@_message
@dataclass(frozen=True, slots=True)
class Note(_Plain):
    """A warning to show in the controller's summary."""

    kind: ClassVar[str] = "note"
    text: str
    #: The connect request whose wait at the gate timed out, when the note says so (0:
    #: none): the controller judges that wait (``gate_watch``) before it shows the note.
    request: int = 0


@_message
@dataclass(frozen=True, slots=True)
class OpenedOutsideTests(_Plain):
    """The worker opened a connection outside any test (``phase``: where, e.g. "session
    start"), after waiting ``waited`` seconds for room: for the summary."""

    kind: ClassVar[str] = "outside"
    phase: str
    waited: float = 0.0


# -- controller -> worker --------------------------------------------------------------------


@_message
@dataclass(frozen=True, slots=True)
class Goes(_Plain):
    """These queued items may start (one message per worker per decision)."""

    kind: ClassVar[str] = "go"
    indices: tuple[int, ...]

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Goes:
        return cls(tuple(wire["indices"]))


@_message
@dataclass(frozen=True, slots=True)
class RequestAnswer(_Plain):
    """The answer to a ``RoomRequest``."""

    kind: ClassVar[str] = "grant"
    request: int
    answer: Answer = Answer.GRANTED

    def to_wire(self) -> Wire:
        return {
            KIND: self.kind,
            VERSION: PROTOCOL_VERSION,
            "request": self.request,
            "answer": self.answer.value,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> RequestAnswer:
        return cls(int(wire["request"]), Answer(wire.get("answer", Answer.GRANTED.value)))


@_message
@dataclass(frozen=True, slots=True)
class ReleaseIdle(_Plain):
    """Close your idle pooled connections: another worker waits for room."""

    kind: ClassVar[str] = "release"


@_message
@dataclass(frozen=True, slots=True)
class ServerPids(_Plain):
    """The backend pids the monitored server listed at ``taken`` (``time.time()``): the
    connections a worker counted before then and that are not listed were ended by the
    server (their driver notices only on next use)."""

    kind: ClassVar[str] = "alive"
    taken: float
    pids: tuple[int, ...]

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> ServerPids:
        return cls(float(wire["taken"]), tuple(int(pid) for pid in wire["pids"]))


@_message
@dataclass(frozen=True, slots=True)
class RoomKnown(_Plain):
    """The run's budget changed once the server, or another login the tests use on it,
    was learned (``ServerSeen``): what a worker asks for to rerun a test alone, and the
    server's room as in ``WorkerSettings``."""

    kind: ClassVar[str] = "room"
    budget: int
    allows: int | None = None
    limit: str = ""

    @property
    def room(self) -> tuple[int, str] | None:
        return None if self.allows is None else (self.allows, self.limit)


WorkerMessage = Collected | Counts | RoomRequest | ServerSeen | Note | OpenedOutsideTests
ControllerMessage = Goes | RequestAnswer | ReleaseIdle | ServerPids | RoomKnown
#: Messages that can unblock a decision: the controller looks at them at once; the
#: others wait for the next xdist event.
WAKING: Final = frozenset({RoomRequest, Counts, ServerSeen})


def decode(wire: object) -> WorkerMessage | ControllerMessage:
    """The message a wire dict holds; ``ProtocolError`` for anything else."""
    if not isinstance(wire, dict):
        raise ProtocolError(f"not a pytest-poolaware message: {wire!r:.80}")
    version = wire.get(VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"a message of protocol version {version!r}, this side speaks {PROTOCOL_VERSION} "
            "(install the same pytest-poolaware on the controller and the workers)"
        )
    reader = _KINDS.get(wire.get(KIND, ""))
    if reader is None:
        raise ProtocolError(f"unknown message kind {wire.get(KIND)!r}")
    try:
        message = reader(wire)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed {wire.get(KIND)!r} message: {exc}") from None
    assert isinstance(message, WorkerMessage | ControllerMessage)
    return message


# -- beside the side channel ------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs of the run's settings; travels once, in ``workerinput``, and
    carries the protocol version the controller speaks."""

    budget: int
    gate_timeout: float
    retry_on_limit: bool
    fast_exit: bool
    #: The longest wait for a go (``Settings.go_timeout``).
    go_timeout: float = GO_TIMEOUT_GATES * DEFAULT_POOL_TIMEOUT
    #: When the budget is the server's own room: what the server allows the login in all,
    #: and which limit that is ("role acc_app CONNECTION LIMIT 16"); a test needing more
    #: fails with a clear message.
    room: tuple[int, str] | None = None
    #: No DSN was given: send the controller the server and login of the first connection
    #: opened to each (``ServerSeen``), so that it can read the room there.
    learn: bool = False

    def to_wire(self) -> Wire:
        return {VERSION: PROTOCOL_VERSION, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> WorkerSettings:
        version = wire.get(VERSION)
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"the controller speaks pytest-poolaware protocol {version!r}, this worker "
                f"{PROTOCOL_VERSION}: install the same pytest-poolaware on both"
            )
        values = {f.name: wire[f.name] for f in fields(cls) if f.name in wire}
        room = values.get("room")
        if room is not None:  # execnet hands a tuple back as a list
            allows, limit = room
            values["room"] = (int(allows), str(limit))
        return cls(**values)


@dataclass(frozen=True)
class ItemMeasures:
    """What a worker measured of one item; it travels as an attribute of the item's last
    report (xdist serializes report attributes)."""

    need: int  # peak connections checked out at once
    peak_open: int  # peak connections open in the worker, idle ones included
    duration: float  # seconds of the attempt that counted
    waited: float  # seconds spent waiting for the budget (go and connect gate)
    start: float  # wall clock (``clock.wall``) when it started
    end: float
    rerun: str  # why it ran twice, "" if it ran once
    open: int  # the worker's open connections once it ended
    idle: int
    version: int  # of the meter's counts above (``PoolMeter.snapshot``)
    #: (start, end) on the wall clock of each wait for the budget long enough to show (the trace).
    waits: tuple[tuple[float, float], ...] = ()
    drivers: tuple[str, ...] = ()  # drivers of the connections it used
    leaks: int = 0  # connections its own code opened or checked out, still held at its end
    #: Its connections met contention: the server refused one (the rerun alone may still
    #: count what the failed attempt's threads held), so ``need`` may count more, or
    #: less, than the test holds alone.
    contended: bool = False
    #: Of ``waited``: for its go (and a rerun's room), before it started; and at the
    #: connect gate inside ``duration`` (threads waiting at once count once), which the
    #: lower bound takes out of it.
    go_waited: float = 0.0
    gate_waited: float = 0.0

    @property
    def net_duration(self) -> float:
        """``duration`` less its time at the connect gate: what the test takes when it
        need not wait (what is learned, and what the lower bound counts)."""
        return max(0.0, self.duration - self.gate_waited)

    def to_wire(self) -> str:
        """A JSON object of the fields by name, as one string: it rides on every item's
        report, and execnet serializes one string much faster than ten values."""
        return json.dumps({name: getattr(self, name) for name in _MEASURE_NAMES})

    @classmethod
    def from_wire(cls, data: str) -> ItemMeasures:
        try:
            values = json.loads(data)
            for name in ("drivers", "waits"):
                if name in values:
                    values[name] = tuple(
                        tuple(value) if isinstance(value, list) else value for value in values[name]
                    )
            return cls(**{name: values[name] for name in _MEASURE_NAMES if name in values})
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed item measures: {exc}") from None


_MEASURE_NAMES: Final = tuple(f.name for f in fields(ItemMeasures))
