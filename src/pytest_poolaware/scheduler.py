"""xdist adapter: the ``Scheduling`` protocol around ``core.Planner``.

``xdist.dsession.DSession`` calls this class on the controller's main thread; it turns
xdist's events and the workers' side-channel messages into planner inputs, and the
planner's actions into xdist commands and side-channel answers (``dispatch`` does the
side channel's part). What it relies on in xdist: ``docs/design.md``, "What the adapter
relies on in xdist".
"""

from __future__ import annotations

import glob
import queue
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pytest_poolaware.dispatch import Dispatcher, RunRecord
from pytest_poolaware.planning.core import (
    Action,
    ItemSpec,
    Order,
    Planner,
    lane_for,
)
from pytest_poolaware.planning.history import History, Selection
from pytest_poolaware.planning.priors import family
from pytest_poolaware.reporting.runstats import ItemResult, RunSnapshot
from pytest_poolaware.shared import compat
from pytest_poolaware.shared.link import ControllerLink
from pytest_poolaware.shared.markers import UNMARKED, Markers, conflict_message
from pytest_poolaware.shared.protocol import (
    Collected,
    ItemMeasures,
    ProtocolError,
    WorkerMessage,
)
from pytest_poolaware.shared.settings import DEFAULT_UNMARKED_POLICY, Settings

if TYPE_CHECKING:
    from xdist.remote import Producer
    from xdist.workermanage import WorkerController

    from pytest_poolaware.budget import RunBudget


class PoolAwareScheduling:
    """Serial lane, budgeted fan-out, learned placement (``--dist poolaware``).

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
        budget: RunBudget[WorkerController],
        history: History,
        links: dict[WorkerController, ControllerLink[WorkerController]],
        inbox: queue.SimpleQueue[tuple[WorkerController, WorkerMessage]],
        serial_worker: str | None = None,
        server_pids: Callable[[], tuple[float, frozenset[int]] | None] | None = None,
    ) -> None:
        self.config = config
        self.log = log.poolawaresched
        self.numnodes = compat.worker_count(config)
        self.settings = settings
        self.history = history
        #: Notes start with the learned data's problems, as they were found first.
        self._record = RunRecord(notes=list(history.problems))
        self._links = links
        #: The run's budget over time (learned, shared...): the dispatcher follows it.
        self.budget = budget
        self.planner: Planner[WorkerController] = Planner(
            budget.statistics().budget,  # a start: the dispatcher sets what it follows
            unknown_need=settings.unknown_need,
            order=Order(settings.order),
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
        self._markers = ReportedMarkers()
        self._measures: dict[tuple[WorkerController, int], ItemMeasures] = {}
        self._dispatch = Dispatcher(
            self.planner,
            self.log,
            budget=budget,
            links=links,
            inbox=inbox,
            joined=self._joined,
            record=self._record,
            on_collected=self._markers.report,
            server_pids=server_pids,
        )

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
        """Load the planner with the first collection, the fan-out held until ``schedule``
        (unless the run has a single worker)."""
        self.collection = collection
        self._collection_source = node.gateway.id
        markers = self._markers.take(node, collection)
        forget_gone(self.config, self.history, collection, self._markers.run, self._record.notes)
        # With one worker there is no one to wait for (and the worker alone must run the
        # serial lane and the fan-out interleaved, in collection order).
        tests = item_specs(
            collection,
            markers,
            self.history,
            unmarked_serial=self.settings.unmarked != DEFAULT_UNMARKED_POLICY,
        )
        self._apply(self.planner.load(tests, fanout_open=self.numnodes == 1))

    def _join(self, node: WorkerController) -> None:
        if node not in self._joined and node in self._nodes:
            self._joined.add(node)
            self._apply(self.planner.add_worker(node))

    def _reject(self, node: WorkerController, collection: list[str]) -> None:
        """A worker collected other tests than the run's: report it as a collection error
        (the run fails) and shut it down; the other workers carry on."""
        assert self.collection is not None
        msg = compat.collection_diff(
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
        self.budget.item_done(node, item_index)
        measures = self._measures.pop((node, item_index), None)
        if measures is None:  # no report carried them (e.g. the item was not run)
            self._apply(self.planner.completed(node, item_index, duration=duration))
            return
        assert self.collection is not None
        nodeid = self.collection[item_index]
        held_back = self.budget.held_back_waits(nodeid, measures.waits)
        lane = self.planner.lane_of(item_index)
        self._record.results.append(ItemResult(nodeid, lane, node.gateway.id, measures, held_back))
        self.history.record(
            nodeid,
            measures.need,
            measures.net_duration,
            contended=measures.contended
            or (measures.waited > 0 and self.budget.held_back_during(measures.start, measures.end)),
        )
        self._apply(
            self.planner.completed(
                node, item_index, need=measures.need, duration=measures.net_duration
            )
        )

    def unfinished(self) -> list[str]:
        """Node ids of the items that never ran to the end (for the not-run reports)."""
        if self.collection is None:
            return []
        return [self.collection[i] for i in self.planner.unfinished()]

    def note_measures(self, node: WorkerController, item_index: int, data: str) -> None:
        """Called by the controller plugin's ``pytest_runtest_logreport`` for an item's
        last report, which arrives before xdist's completion event."""
        self._drain()  # side-channel news sent before this report comes first
        try:
            measures = ItemMeasures.from_wire(data)
        except ProtocolError as exc:  # the item is still reported; only its measures are lost
            self._record.notes.append(f"[{node.gateway.id}] {exc}")
            return
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
        """Called by ``DSession.worker_workerfinished`` and ``worker_errordown``.

        A worker that died before it was ready (its session could not start) raises
        KeyError, as with xdist's own schedulers: ``worker_errordown`` expects it.
        """
        self._drain()
        self._links.pop(node, None)
        if node not in self._joined:
            self._dispatch.detach(node)  # it may have connected before it joined
        if node not in self._nodes:
            raise KeyError(node)
        self._nodes.remove(node)
        if node in self._collected_nodes:
            self._collected_nodes.remove(node)
        if node not in self._joined:
            return None
        self._joined.discard(node)
        finished = compat.finished_normally(node)
        crashed, actions = self.planner.remove_worker(node, crashed=not finished)
        self._apply(actions)
        if crashed is None or self.collection is None:
            return None
        return self.collection[crashed]

    def snapshot(self) -> RunSnapshot:
        """The run as the scheduler saw it, for the report and the marker advice."""
        return self._record.snapshot(
            self.planner,
            workers=self.numnodes,
            collection=tuple(self.collection or ()),
            markers=tuple(self._markers.markers or ()),
        )

    def keep_within(self, started: float, finished: float) -> None:
        """Tests' start and end lie within the session, whatever a test did to the clock
        (``RunRecord.keep_within``)."""
        self._record.keep_within(started, finished)

    def take_last_news(self) -> None:
        """At the session's end: the workers' last counts (sent as they finished) may
        still wait in the inbox; the report's end-of-run figures need them."""
        self._drain()

    def _drain(self) -> None:
        self._dispatch.drain()

    def _apply(self, actions: list[Action]) -> None:
        self._dispatch.apply(actions)


class ReportedMarkers:
    """Markers and marker conflicts the workers report with their collections: those of
    the worker whose collection is the run's are the run's, the others are dropped."""

    def __init__(self) -> None:
        self._reported: dict[WorkerController, Collected] = {}
        #: The run's markers, per item, once its collection is in.
        self.markers: list[Markers] | None = None
        #: What the worker whose collection is the run's reported with it.
        self.run = Collected(())

    def report(self, node: WorkerController, message: Collected) -> None:
        """A worker's markers: only those of the run's collection are used."""
        if self.markers is None:
            self._reported[node] = message

    def take(self, node: WorkerController, collection: Sequence[str]) -> list[Markers]:
        """The run's markers: those ``node`` reported with the run's collection. Both
        markers on one test contradict each other: refuse to guess."""
        reported = self.run = self._reported.pop(node, Collected(()))
        self._reported.clear()
        markers = list(reported.markers)
        if len(markers) != len(collection):
            markers = [UNMARKED] * len(collection)
        self.markers = markers
        if reported.conflicts:
            raise pytest.UsageError(conflict_message(reported.conflicts))
        return markers


def item_specs(
    collection: Sequence[str],
    markers: Sequence[Markers],
    history: History,
    *,
    unmarked_serial: bool,
) -> list[ItemSpec]:
    """What the planner is loaded with: each test's lane, from its markers and what was
    learned of it, its need and duration as learned, its groups and its relatives."""
    tests = []
    for nodeid, marked in zip(collection, markers, strict=True):
        measure = history.get(nodeid)
        lane = lane_for(
            serial=marked.serial,
            parallel=marked.parallel,
            measured=measure is not None and measure.need is not None,
            unmarked_serial=unmarked_serial,
        )
        tests.append(
            ItemSpec(
                lane,
                measure.need if measure else None,
                measure.duration if measure else None,
                group=nodeid.split("::", 1)[0],
                xdist_group=marked.xdist_group,
                family=family(nodeid),
            )
        )
    return tests


def forget_gone(
    config: pytest.Config,
    history: History,
    collection: Sequence[str],
    reported: Collected,
    notes: list[str],
) -> None:
    """Forget the learned data of the tests that no longer exist: on a run of the whole
    suite, those it did not collect; on any run, those whose file is gone."""
    root = config.rootpath
    stale = history.forget_missing(
        collection,
        whole_suite=run_selection(config, reported).whole_suite,
        file_exists=lambda path: (root / path).exists(),
    )
    if stale:
        notes.append(f"forgot the learned data of {stale} tests that no longer exist")


def run_selection(config: pytest.Config, reported: Collected) -> Selection:
    """How much of the suite this run collected, from pytest's options and arguments and
    what the run's collection left out (``Selection``)."""
    root = config.rootpath.resolve()
    suite = [
        Path(found).resolve()
        for pattern in config.getini("testpaths") or []
        for found in glob.glob(str(root / pattern), recursive=True)
    ]
    if config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        paths = suite  # the run's arguments are the configured testpaths
    else:
        invoked = config.invocation_params.dir
        paths = [(invoked / arg.split("::", 1)[0]).resolve() for arg in config.args]
    return Selection(
        tuple(paths),
        tuple(suite or [root]),
        node_ids=any("::" in arg for arg in config.args),
        last_failed=bool(config.getoption("lf", False)),
        keyword=config.getoption("keyword", "") or "",
        markexpr=config.getoption("markexpr", "") or "",
        deselected=reported.deselected,
        uncollected=reported.uncollected,
    )
