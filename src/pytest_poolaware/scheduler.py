"""xdist adapter: the ``Scheduling`` protocol around ``core.Planner``.

``xdist.dsession.DSession`` calls this class on the controller's main thread; it turns
xdist's events and the workers' side-channel messages into planner inputs, and the
planner's actions into xdist commands and side-channel answers.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from xdist.remote import Producer
from xdist.report import report_collection_diff
from xdist.workermanage import WorkerController, parse_tx_spec_config

from pytest_poolaware.core import (
    Action,
    Go,
    Grant,
    ItemSpec,
    Lane,
    Planner,
    Release,
    Send,
    Shutdown,
    lane_for,
)
from pytest_poolaware.history import History
from pytest_poolaware.link import ControllerLink, ItemMeasures, Message
from pytest_poolaware.settings import DEFAULT_UNMARKED_POLICY, Settings


@dataclass(frozen=True)
class ItemResult:
    """What the controller learned about one finished item."""

    nodeid: str
    lane: Lane
    worker: str
    measures: ItemMeasures


@dataclass
class RunRecord:
    """Per-run facts collected for the summary and the learned data."""

    results: list[ItemResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    #: (time.time(), worker id, open connections) each time a worker's count changed.
    timeline: list[tuple[float, str, int]] = field(default_factory=list)
    #: Workers the run asked for (``-n``).
    workers: int = 0


class PoolAwareScheduling:
    """Serial lane, budgeted fan-out, learned ordering (``--dist poolaware``).

    The first collection in is the run's. The first worker spawned, which keeps its CPU
    priority (see ``priority``), joins the planner as soon as it has collected, and may
    start the serial lane while the others still boot; they join, and the fan-out is
    shared out, when xdist calls ``schedule``. A collection that differs from the run's
    is a collection error: that worker takes no part, and the others run every test of
    the run's collection.
    """

    def __init__(
        self,
        config: pytest.Config,
        log: Producer,
        *,
        settings: Settings,
        history: History,
        links: dict[WorkerController, ControllerLink],
        inbox: queue.SimpleQueue[tuple[Any, Message]],
        record: RunRecord,
        serial_worker: str | None = None,
        share: Any = None,
    ) -> None:
        self.config = config
        self.log = log.poolawaresched
        self.numnodes = len(parse_tx_spec_config(config))
        record.workers = self.numnodes
        self.settings = settings
        self.history = history
        self.record = record
        self._links = links
        self._inbox = inbox
        #: This run's share of the server's room (``share.ShareCoordinator``), if shared:
        #: consulted before every decision.
        self.share = share
        self.planner: Planner[WorkerController] = Planner(
            share.budget() if share is not None else settings.budget,
            unknown_need=settings.unknown_need,
        )
        #: Gateway id of the worker that keeps its CPU priority (the first spawned): it
        #: joins as soon as it has collected, to start the serial lane.
        self.serial_worker = serial_worker
        #: Workers whose collection is the run's, in the order they collected.
        self._collected_nodes: list[WorkerController] = []
        #: Collections received, the rejected ones included: xdist's "all collected".
        self._collected = 0
        #: Whether xdist has called ``schedule`` (from then on it sees the run as active).
        self._scheduled = False
        self._nodes: list[WorkerController] = []
        self._joined: set[WorkerController] = set()
        self.collection: list[str] | None = None
        #: The worker whose collection is the run's (named in collection-diff errors).
        self._collection_source = ""
        self._markers: list[tuple[bool, bool]] | None = None
        #: Markers and marker conflicts each worker reported with its collection.
        self._reported: dict[Any, tuple[list[tuple[bool, bool]], list[str]]] = {}
        self._measures: dict[tuple[WorkerController, int], ItemMeasures] = {}

    # -- Scheduling protocol ----------------------------------------------------------------

    @property
    def nodes(self) -> list[WorkerController]:
        return list(self._nodes)

    @property
    def collection_is_completed(self) -> bool:
        return self._collected >= self.numnodes

    @property
    def tests_finished(self) -> bool:
        return self.collection_is_completed and self.planner.tests_finished

    @property
    def has_pending(self) -> bool:
        """False until ``schedule`` though the serial lane may run: DSession prints its
        "N workers [M items]" line when the last collection comes in and nothing is
        pending yet, as with its own schedulers."""
        return self._scheduled and self.planner.has_pending

    def add_node(self, node: WorkerController) -> None:
        """Called by ``DSession.worker_workerready``."""
        assert node not in self._nodes
        self._nodes.append(node)

    def add_node_collection(self, node: WorkerController, collection: Sequence[str]) -> None:
        """Called by ``DSession.worker_collectionfinish``, before ``schedule``: the first
        collection starts the run. The serial lane's worker joins at once, the others at
        ``schedule``, or at once when it has been called (replacements)."""
        self._collected += 1
        self._drain()
        collected = list(collection)
        if self.collection is None:
            self._start(node, collected)
        elif collected != self.collection:
            self._reject(node, collected)
            return
        self._collected_nodes.append(node)
        if self._scheduled or node.gateway.id == self.serial_worker:
            self._join(node)

    def schedule(self) -> None:
        """Called by ``DSession.worker_collectionfinish`` once as many collections as
        ``-n`` have come in (those of crashed, replaced or rejected workers count), and
        again for each later one: every collected worker joins; the fan-out opens."""
        self._drain()
        self._scheduled = True
        for node in list(self._collected_nodes):
            self._join(node)
        if self.planner.loaded:
            self._apply(self.planner.open_fanout())

    def _start(self, node: WorkerController, collection: list[str]) -> None:
        """Load the planner with the first collection, the fan-out held until ``schedule``."""
        self.collection = collection
        self._collection_source = node.gateway.id
        stale = self.history.forget_missing(collection)
        if stale:
            self.record.notes.append(
                f"forgot the learned data of {stale} tests that no longer exist"
            )
        markers, self.record.conflicts = self._reported.pop(node, ([], []))
        self._reported.clear()
        if len(markers) != len(collection):
            markers = [(False, False)] * len(collection)
        self._markers = markers
        if self.record.conflicts:
            from pytest_poolaware.plugin import conflict_message

            raise pytest.UsageError(conflict_message(self.record.conflicts))
        self._apply(self.planner.load(self._tests(), fanout_open=False))

    def _join(self, node: WorkerController) -> None:
        if node not in self._joined and node in self._nodes:
            self._joined.add(node)
            self._apply(self.planner.add_worker(node))

    def _reject(self, node: WorkerController, collection: list[str]) -> None:
        """A worker collected other tests than the run's: report it as a collection error
        (the run fails) and shut it down; the other workers carry on."""
        assert self.collection is not None
        msg = report_collection_diff(
            self.collection, collection, self._collection_source, node.gateway.id
        )
        self.log(msg)
        self.config.hook.pytest_collectreport(
            report=pytest.CollectReport(
                nodeid=node.gateway.id, outcome="failed", longrepr=msg, result=[]
            )
        )
        node.shutdown()

    def mark_test_complete(
        self, node: WorkerController, item_index: int, duration: float = 0
    ) -> None:
        """Called by ``DSession.worker_runtest_protocol_complete``."""
        self._drain()
        measures = self._measures.pop((node, item_index), None)
        if measures is None:  # no report carried them (e.g. the item was not run)
            self._apply(self.planner.completed(node, item_index, duration=duration))
            return
        assert self.collection is not None
        nodeid = self.collection[item_index]
        self.record.results.append(
            ItemResult(nodeid, self.planner.lane_of(item_index), node.gateway.id, measures)
        )
        self.history.record(
            nodeid,
            measures.need,
            measures.duration,
            contended=measures.contended
            or (
                self.share is not None
                and measures.waited > 0
                and self.share.held_back_during(measures.start, measures.end)
            ),
        )
        self._apply(
            self.planner.completed(node, item_index, need=measures.need, duration=measures.duration)
        )

    def unfinished(self) -> list[str]:
        """Node ids of the items that never ran to the end (for the not-run reports)."""
        if self.collection is None:
            return []
        return [self.collection[i] for i in self.planner.unfinished()]

    def note_measures(self, node: WorkerController, item_index: int, data: Any) -> None:
        """Called by the controller plugin's ``pytest_runtest_logreport`` for an item's
        last report, which arrives before xdist's completion event."""
        self._drain()  # side-channel news sent before this report comes first
        measures = ItemMeasures.from_json(data)
        self._measures[(node, item_index)] = measures
        if node in self._joined and self.planner.counts_changed(
            node, measures.open, measures.idle, measures.version
        ):
            self._apply(
                self.planner.counts(node, measures.open, measures.idle, version=measures.version)
            )

    def mark_test_pending(self, item: str) -> None:
        """Called by ``pytest_handlecrashitem`` implementations that want a crashed item rerun."""
        assert self.collection is not None
        self._apply(self.planner.requeue(self.collection.index(item)))

    def remove_pending_tests_from_node(
        self, node: WorkerController, indices: Sequence[int]
    ) -> None:
        """Called by ``DSession.worker_unscheduled``: xdist's ``steal`` is never sent here,
        so this event only means "a worker sent side-channel news, look at it now"."""
        self._drain()
        self._apply([])

    def remove_node(self, node: WorkerController) -> str | None:
        """Called by ``DSession.worker_workerfinished`` and ``worker_errordown``."""
        self._drain()
        self._nodes.remove(node)
        if node in self._collected_nodes:
            self._collected_nodes.remove(node)
        self._links.pop(node, None)
        if node not in self._joined:
            return None
        self._joined.discard(node)
        # xdist sets workeroutput when a worker ends its session normally.
        finished = hasattr(node, "workeroutput")
        crashed, actions = self.planner.remove_worker(node, crashed=not finished)
        self._apply(actions)
        if crashed is None or self.collection is None:
            return None
        return self.collection[crashed]

    @property
    def markers(self) -> list[tuple[bool, bool]]:
        """(serial_only, parallel_safe) per collected item, as the workers reported them
        (a copy, read by the report and the marker advice)."""
        return list(self._markers or [])

    # -- helpers ----------------------------------------------------------------------------

    def _tests(self) -> list[ItemSpec]:
        assert self.collection is not None
        assert self._markers is not None
        unmarked_serial = self.settings.unmarked != DEFAULT_UNMARKED_POLICY
        tests = []
        for nodeid, (serial, parallel) in zip(self.collection, self._markers, strict=True):
            measure = self.history.get(nodeid)
            lane = lane_for(
                serial=serial,
                parallel=parallel,
                measured=measure is not None and measure.need is not None,
                unmarked_serial=unmarked_serial,
            )
            tests.append(
                ItemSpec(
                    lane,
                    measure.need if measure else None,
                    measure.duration if measure else None,
                    group=nodeid.split("::", 1)[0],
                )
            )
        return tests

    def _consult_share(self) -> None:
        """Tell the run's share what the run uses, and follow it when it moved."""
        share = self.share
        self._apply(
            self.planner.set_budget(
                share.budget(), ceiling=share.ceiling_now(), give_way=share.give_way()
            )
        )

    def _report_to_share(self) -> None:
        """What the run uses and waits for, after every decision: the share moves on it."""
        planner = self.planner
        stats = planner.statistics()
        self.share.report(
            in_use=stats.committed,
            open_=stats.open,
            pending=planner.has_pending or not planner.loaded,
            wants=planner.largest_waiting_need(),
            using=planner.budget,
        )

    def _drain(self) -> None:
        """Feed the workers' side-channel messages to the planner, oldest first."""
        if self.share is not None:
            self._consult_share()
        for node in self._joined:
            if node.shutting_down:  # DSession stops the run by shutting workers down
                self.planner.shut_down(node)
        while True:
            try:
                node, message = self._inbox.get_nowait()
            except queue.Empty:
                return
            tag = message[0]
            self.log("received", node.gateway.id, message if tag != "collected" else tag)
            if tag == "collected":
                if self.collection is None:  # only the run's collection's are used
                    markers = [(bool(s), bool(p)) for s, p in message[1]]
                    self._reported[node] = (markers, list(message[2]))
            elif tag == "counts":
                _, open_, idle, released, version = message
                self.record.timeline.append((time.time(), node.gateway.id, open_))
                if node in self._joined:
                    self._apply(
                        self.planner.counts(node, open_, idle, released=released, version=version)
                    )
            elif tag == "request":
                if node in self._joined:
                    _, request, want, index = message
                    if want is not None:  # a rerun asks for the whole budget: as it is now
                        want = min(want, self.planner.budget)
                    self._apply(self.planner.request(node, request, want, item=index))
            elif tag == "note":
                self.record.notes.append(f"[{node.gateway.id}] {message[1]}")

    def _apply(self, actions: list[Action]) -> None:
        goes: dict[Any, list[int]] = {}
        if actions and self.log.enabled:  # describing the state costs: only for --debug
            self.log("state", self.planner.describe())
        for action in actions:
            self.log(action)
            node: Any = action.worker
            if isinstance(action, Send):
                node.send_runtest_some(list(action.indices))
            elif isinstance(action, Shutdown):
                node.shutdown()
            elif isinstance(action, Go):
                goes.setdefault(node, []).append(action.index)
            else:
                link = self._links.get(node)
                if link is None:
                    continue
                if isinstance(action, Grant):
                    link.send("grant", action.request, action.answer.value)
                elif isinstance(action, Release):
                    link.send("release")
        # One message per worker: goes are the most frequent answer.
        for node, indices in goes.items():
            link = self._links.get(node)
            if link is not None:
                link.send("go", indices)
        if self.share is not None:
            self._report_to_share()
