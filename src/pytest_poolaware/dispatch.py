"""Between the planner and the workers, on the controller: the workers' side-channel
news goes in, the planner's actions go out as xdist commands and side-channel answers.

The xdist adapter (``scheduler``) owns the ``Scheduling`` protocol and the collection; it
calls ``drain`` before every decision and ``apply`` after it.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final

from pytest_poolaware.gate_watch import GateWatch
from pytest_poolaware.planning.core import (
    Action,
    Answer,
    Go,
    Grant,
    Lane,
    Planner,
    Release,
    Send,
    Shutdown,
)
from pytest_poolaware.reporting.findings import Stall
from pytest_poolaware.reporting.runstats import ItemResult, RunSnapshot
from pytest_poolaware.shared import compat
from pytest_poolaware.shared.clock import monotonic, wall
from pytest_poolaware.shared.limits import RunUse
from pytest_poolaware.shared.link import ControllerLink
from pytest_poolaware.shared.markers import UNMARKED, Markers
from pytest_poolaware.shared.protocol import (
    Collected,
    Counts,
    Goes,
    Note,
    OpenedOutsideTests,
    ReleaseIdle,
    RequestAnswer,
    RoomRequest,
    ServerPids,
    ServerSeen,
    WorkerMessage,
)

if TYPE_CHECKING:
    from xdist.remote import Producer
    from xdist.workermanage import WorkerController

    from pytest_poolaware.budget import Change, RunBudget


@dataclass
class OutsideTests:
    """Connections the workers opened outside any test (session start, say), by where:
    they count against the budget like a test's, and the summary says so."""

    opened: dict[str, int] = field(default_factory=dict)
    longest_wait: float = 0.0

    def note(self, phase: str, waited: float) -> None:
        self.opened[phase] = self.opened.get(phase, 0) + 1
        self.longest_wait = max(self.longest_wait, waited)

    def summary(self) -> str | None:
        """One line for the summary (None: no connection was opened outside a test)."""
        if not self.opened:
            return None
        total = sum(self.opened.values())
        where = ", ".join(f"{count} at {phase}" for phase, count in self.opened.items())
        line = f"{total} connections opened outside tests ({where}), counted in the budget"
        if self.longest_wait >= OUTSIDE_WAIT_WORTH_SAYING:
            line += f"; the longest waited {self.longest_wait:.1f}s for room"
        return line


#: A wait for room outside any test worth naming in the summary, in seconds.
OUTSIDE_WAIT_WORTH_SAYING: Final = 1.0
#: How far outside the session a test's stamp may lie and still be the clocks' own
#: error, clamped without a note: each process anchors its clock on its own
#: (``shared.clock``), a few milliseconds apart at worst on a busy machine, and the last
#: test ends a few milliseconds before the session does. A moved clock is off by years.
STAMP_SKEW: Final = 0.5


@dataclass
class RunRecord:
    """What the controller gathers as the run goes, for the scheduler's ``snapshot``."""

    results: list[ItemResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timeline: list[tuple[float, str, int]] = field(default_factory=list)
    #: (time.time(), budget) each time the budget in force moved (sharing, the server).
    budgets: list[tuple[float, int]] = field(default_factory=list)
    outside: OutsideTests = field(default_factory=OutsideTests)
    #: Connects kept waiting at the gate while the budget had room (``gate_watch``).
    stalls: list[Stall] = field(default_factory=list)

    def snapshot(
        self,
        planner: Planner[Any],
        *,
        workers: int,
        collection: tuple[str, ...],
        markers: tuple[Markers, ...],
    ) -> RunSnapshot:
        """The run as the scheduler saw it, for the report and the marker advice."""
        if len(markers) != len(collection):
            markers = (UNMARKED,) * len(collection)
        loaded = planner.loaded
        statistics = planner.statistics()
        return RunSnapshot(
            workers=workers,
            collection=collection,
            markers=markers,
            lanes=tuple(
                planner.lane_of(i) if loaded else Lane.FANOUT for i in range(len(collection))
            ),
            results=tuple(self.results),
            overruns=statistics.overruns,
            stalls=tuple(self.stalls),
            peak_open=statistics.peak_open,
            timeline=tuple(self.timeline),
            budgets=tuple(self.budgets),
            notes=tuple(self.notes) + _out_of_order_note(planner) + self._outside_note(),
            order=planner.order.value,
            placement=planner.placement.value,
            learned=statistics.learned,
            largest_budget=statistics.largest_budget,
            priors=tuple(planner.prior_of(i) for i in range(len(collection))) if loaded else (),
        )

    def _outside_note(self) -> tuple[str, ...]:
        line = self.outside.summary()
        return () if line is None else (line,)

    def keep_within(self, started: float, finished: float) -> int:
        """Clamp the tests' stamps to the session (``started`` to ``finished``), whatever
        a test did to the clock, and say so in a note; returns how many tests had a stamp
        further outside it than the clocks' own error (``STAMP_SKEW``). Workers stamp
        with a clock tests cannot move (``clock``), so the note is a last guard, never a
        routine."""

        def inside(stamp: float) -> float:
            return min(max(stamp, started), finished)

        moved, furthest = 0, 0.0
        for position, result in enumerate(self.results):
            measures = result.measures
            stamps = (measures.start, measures.end, *(t for w in measures.waits for t in w))
            if all(started <= t <= finished for t in stamps):
                continue
            off = max(max(started - t, t - finished) for t in stamps)
            if off > STAMP_SKEW:
                moved += 1
                furthest = max(furthest, off)
            self.results[position] = replace(
                result,
                measures=replace(
                    measures,
                    start=inside(measures.start),
                    end=inside(measures.end),
                    waits=tuple((inside(a), inside(b)) for a, b in measures.waits),
                ),
                held_back=tuple((inside(a), inside(b)) for a, b in result.held_back),
            )
        if moved:
            self.notes.append(
                f"{moved} tests were stamped outside the session, by up to {furthest:.3g}s "
                "(something moved the plugin's clock); their times are shown clamped to it"
            )
        return moved


def _out_of_order_note(planner: Planner[Any]) -> tuple[str, ...]:
    """Tests run out of collection order because no worker could take them in order
    (a crash, usually): worth knowing when a hidden order dependency shows."""
    count = len(planner.out_of_order)
    if not count:
        return ()
    return (f"{count} tests ran after later ones on their worker: none could take them in order",)


class Dispatcher:
    """Feeds the side channel's messages to the planner and carries out its actions.

    ``joined``: the workers the planner knows (the adapter's own set: news from others is
    not the planner's). ``on_collected``: where ``Collected`` messages go (the adapter
    reads markers from them). ``budget``: the run's budget, whose every change the
    planner follows and the workers are told of.
    """

    def __init__(
        self,
        planner: Planner[WorkerController],
        log: Producer,
        *,
        budget: RunBudget[WorkerController],
        links: dict[WorkerController, ControllerLink[WorkerController]],
        inbox: queue.SimpleQueue[tuple[WorkerController, WorkerMessage]],
        joined: set[WorkerController],
        record: RunRecord,
        on_collected: Callable[[WorkerController, Collected], None],
        server_pids: Callable[[], tuple[float, frozenset[int]] | None] | None = None,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self.planner = planner
        self.log = log
        self._budget = budget
        self._links = links
        self._inbox = inbox
        self._joined = joined
        self._record = record
        #: The server's latest (time, backend pids) when it is monitored, and the time of
        #: the last one sent to the workers.
        self._server_pids = server_pids
        self._pids_sent = 0.0
        #: The workers' notes taken so far: another worker saying the same adds nothing.
        self._noted: set[str] = set()
        #: Requests whose worker stopped waiting (its gate timed out): never answered.
        self._given_up: set[tuple[WorkerController, int]] = set()
        #: Every connect request's wait, judged: one the budget had room for is a fault.
        self._watch: GateWatch[WorkerController] = GateWatch(
            record.stalls, lambda node: str(node.gateway.id), clock=clock
        )
        #: What each kind of message from a worker does.
        self._handlers: dict[type, Callable[[WorkerController, Any], None]] = {
            Collected: on_collected,
            Counts: self._counts,
            ServerSeen: self._server_seen,
            RoomRequest: self._room_request,
            Note: self._note,
            OpenedOutsideTests: self._opened_outside_tests,
        }
        # The planner follows the budget from here, starting with what it is now (nothing
        # is attached yet: no action to carry out, and nothing to tell a share).
        start = budget.subscribe(self._budget_changed, open_now=lambda: planner.statistics().open)
        record.budgets.append((wall(), start.budget))
        self._carry_out(planner.set_budget(start))

    def admits(self, node: WorkerController) -> bool:
        """Whether the planner counts and admits this worker's connections: from the moment
        its side channel is up, long before it joins (a suite may connect in
        ``pytest_configure``, at conftest import or in ``pytest_sessionstart``), until it
        is removed (its link is gone: what it still sends is stale)."""
        if node not in self._links:
            return False
        self.planner.attach(node)  # idempotent; nothing is placed on attaching
        return True

    def detach(self, node: WorkerController) -> None:
        """A worker that never joined is gone: what it held or asked for no longer counts."""
        self._budget.worker_gone(node)
        self.apply(self.planner.remove_worker(node)[1])

    def _budget_changed(self, change: Change) -> None:
        """The budget moved (its owner publishes each change once): every worker is told
        what a test may have alone and the room, and the planner follows."""
        if change.workers is not None:
            for link in self._links.values():
                link.send(change.workers)
        if change.planner is not None:
            if change.planner.budget != self._record.budgets[-1][1]:
                self._record.budgets.append((wall(), change.planner.budget))
            self.apply(self.planner.set_budget(change.planner))

    def _report_use(self) -> None:
        """What the run uses and waits for, after every decision, when it shares the room:
        the share moves on it."""
        if not self._budget.sharing:
            return
        planner = self.planner
        stats = planner.statistics()
        stuck, rerun_waits = planner.mid_test_waits()
        self._budget.report_use(
            RunUse(
                in_use=stats.committed,
                open=stats.open,
                pending=planner.has_pending or not planner.loaded,
                wants=planner.largest_waiting_need(),
                using=planner.budget,
                rerun_waits=rerun_waits,
                stuck=stuck,
            )
        )

    def drain(self) -> None:
        """Feed the workers' side-channel messages to the planner, oldest first, once the
        budget's news (the server learned, the share moved) is in."""
        self._budget.poll()
        self._report_use()
        for node in self._joined:
            if compat.is_shutting_down(node):  # DSession stops a run by shutting workers down
                self.planner.shut_down(node)
        while True:
            try:
                node, message = self._inbox.get_nowait()
            except queue.Empty:
                return
            shown = message.kind if isinstance(message, Collected) else message
            self.log("received", node.gateway.id, shown)
            self._handlers[type(message)](node, message)

    def _counts(self, node: WorkerController, message: Counts) -> None:
        self._record.timeline.append((wall(), node.gateway.id, message.open))
        if self.admits(node):
            self.apply(
                self.planner.counts(
                    node,
                    message.open,
                    message.idle,
                    released=message.released,
                    version=message.version,
                )
            )

    def _server_seen(self, node: WorkerController, message: ServerSeen) -> None:
        self._budget.seen(message, node.gateway.spec)

    def _room_request(self, node: WorkerController, message: RoomRequest) -> None:
        link, rid = self._links.get(node), message.request
        self._watch.arrived(node, message, link.arrival(rid) if link is not None else None)
        if (node, rid) in self._given_up or not self.admits(node):
            self._watch.dropped(node, rid)
            return
        held = self._budget.holds(node, message)
        if held is not None:
            room = self.planner.has_room_for_one_more(node)
            self._watch.held(node, rid, held, room=room)
            return
        # A rerun asks for the whole budget; admission grants it what the budget may
        # grow to, once it has that (``AdmissionPass._answer_rerun``).
        actions = self.planner.request(
            node,
            message.request,
            message.want,
            item=message.item,
            background=message.background,
        )
        answer = next(
            (
                a.answer
                for a in actions
                if isinstance(a, Grant) and (a.worker, a.request) == (node, rid)
            ),
            None,
        )
        self._watch.considered(node, rid, granted=answer is Answer.GRANTED)
        if answer is None:
            self._reconcile()
        self.apply(actions)

    def _note(self, node: WorkerController, message: Note) -> None:
        if message.request and self._gave_up(node, message.request):
            return  # not a wait for the budget: a fault, reported as one
        if message.text not in self._noted:  # said once, whichever worker says it
            self._noted.add(message.text)
            self._record.notes.append(f"[{node.gateway.id}] {message.text}")

    def _gave_up(self, node: WorkerController, rid: int) -> bool:
        """The worker's gate timed out on request ``rid``: it is withdrawn (held, or kept
        by the planner), and whether that wait was a fault is judged."""
        fault = self._watch.gave_up(node, rid)
        self._given_up.add((node, rid))
        self._watch.dropped(node, rid)
        self.apply(self.planner.withdraw(node, rid))
        return fault

    def _opened_outside_tests(self, node: WorkerController, message: OpenedOutsideTests) -> None:
        self._record.outside.note(message.phase, message.waited)

    def _reconcile(self) -> None:
        """A gate wait begins: send the server's backend pids to the workers, so they
        uncount connections the server ended (their drivers notice only on next use)."""
        sample = self._server_pids() if self._server_pids is not None else None
        if sample is None or sample[0] <= self._pids_sent:
            return
        self._pids_sent = sample[0]
        pids = tuple(sorted(sample[1]))
        for node in self._joined:
            link = self._links.get(node)
            if link is not None:
                link.send(ServerPids(sample[0], pids))

    def apply(self, actions: list[Action]) -> None:
        """Carry out the planner's actions, then tell the share what the run uses now."""
        self._carry_out(actions)
        self._report_use()

    def _carry_out(self, actions: list[Action]) -> None:
        goes: dict[WorkerController, list[int]] = {}
        if actions and self.log.enabled:  # describing the state costs: only for --debug
            self.log("state", self.planner.describe())
        for action in actions:
            self.log(action)
            if isinstance(action, Go):
                goes.setdefault(action.worker, []).append(action.index)
            else:
                self._send(action)
        # One message per worker: goes are the most frequent answer.
        for node, indices in goes.items():
            link = self._links.get(node)
            if link is not None:
                link.send(Goes(tuple(indices)))

    def _send(self, action: Action) -> None:
        """One action other than a go: an xdist command, or an answer on the side channel."""
        node: WorkerController = action.worker
        if isinstance(action, Send):
            node.send_runtest_some(list(action.indices))
        elif isinstance(action, Shutdown):
            node.shutdown()
        else:
            link = self._links.get(node)
            if link is None:
                return
            if isinstance(action, Grant):
                link.send(RequestAnswer(action.request, action.answer))
            elif isinstance(action, Release):
                link.send(ReleaseIdle())
