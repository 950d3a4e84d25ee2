"""A popular project's own suite under ``--dist load`` and ``--dist poolaware``: the wall.

    python benchmarks/peer_wall.py [--rounds N] [--slice full|ci] [--workers W] [--out DIR]

The project's checks (``peers/run.py``, run by CI) compare outcomes test by test on a
slice sized for CI. This measures what a user sees on the whole of it: SQLAlchemy's
``test/sql`` and ``test/dialect/postgresql`` on asyncpg (``--slice full``, about 18,700
tests), with no poolaware option. One cold poolaware run fills the cache; then each
round runs ``load`` and poolaware warm, interleaved, each against a fresh throwaway
server. Walls are process walls; the figure is the median of the per-round ratios
warm / load. Outcomes are compared test by test with the same round's ``load``.
Writes DIR/peer_wall.md and DIR/peer_wall.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Final

PEERS_DIR: Final = Path(__file__).resolve().parent.parent / "peers"


def _peers_runner() -> ModuleType:
    """``peers/run.py`` (download, install, server, one run), under a name of its own:
    ``run`` here is ``benchmarks/run.py``."""
    sys.path.insert(0, str(PEERS_DIR))  # for its own ``from outcomes import ...``
    spec = importlib.util.spec_from_file_location("peers_run", PEERS_DIR / "run.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


peers: Any = _peers_runner()

DEFAULT_OUT: Final = Path(__file__).resolve().parent / "results"
DEFAULT_ROUNDS: Final = 3
#: The whole of the two folders the issue names, or the CI slice.
SLICES: Final = {"full": ("test/sql", "test/dialect/postgresql"), "ci": None}
LOAD: Final = peers.Mode("load", "load", "cache-load", fresh_cache=True)
COLD: Final = peers.Mode("poolaware-cold", "poolaware", "cache-poolaware", fresh_cache=True)
WARM: Final = peers.Mode("poolaware-warm", "poolaware", "cache-poolaware", fresh_cache=False)


def timed(peer: Any, mode: Any, source: Path, workers: int) -> tuple[Any, float]:
    """One run and its process wall (``peers.run_mode`` prints it; measured here again
    around the same call, server start included for both modes alike)."""
    started = time.perf_counter()
    outcome = peers.run_mode(peer, mode, source, workers, ())
    return outcome, time.perf_counter() - started


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure(peer: Any, source: Path, workers: int, rounds: int) -> dict[str, Any]:
    cold, cold_wall = timed(peer, COLD, source, workers)
    walls: dict[str, list[float]] = {LOAD.label: [], WARM.label: []}
    differences: list[str] = []
    tests: list[int] = []
    for round_ in range(rounds):
        reference, load_wall = timed(peer, LOAD, source, workers)
        warm, warm_wall = timed(peer, WARM, source, workers)
        walls[LOAD.label].append(round(load_wall, 1))
        walls[WARM.label].append(round(warm_wall, 1))
        tests.append(len(reference.tests))
        compared = [warm, cold] if round_ == 0 else [warm]
        found = peers.compare_runs(reference, compared)
        differences += [f"round {round_ + 1}: {line}" for line in found]
    ratios = [w / lw for w, lw in zip(walls[WARM.label], walls[LOAD.label], strict=True)]
    return {
        "cold_wall": round(cold_wall, 1),
        "walls": walls,
        "tests": tests,
        "ratios": [round(r, 3) for r in ratios],
        "warm_over_load": round(statistics.median(ratios), 3),
        "differences": differences,
    }


def render(report: dict[str, Any]) -> str:
    figures = report["figures"]
    lines = [
        f"{report['peer']} ({report['sdist']}), {report['slice']}: {report['modules']}, "
        f"-n {report['workers']}, {report['rounds']} interleaved rounds; load average at "
        f"start {report['loadavg_at_start']}, at end {report['loadavg_at_end']}.",
        "",
        "| run | walls s | median s |",
        "|---|---|---:|",
    ]
    for label, walls in figures["walls"].items():
        lines.append(f"| {label} | {walls} | {statistics.median(walls):.1f} |")
    lines.append(f"| poolaware-cold (once, first) | [{figures['cold_wall']}] | |")
    lines += [
        "",
        f"Tests per run: {figures['tests']}. Warm / load per round: {figures['ratios']}, "
        f"median **{figures['warm_over_load']}**.",
        f"Outcomes differing from the same round's load: {len(figures['differences'])}.",
    ]
    lines += [f"- {line}" for line in figures["differences"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--slice", choices=sorted(SLICES), default="full")
    parser.add_argument("--workers", type=int, default=peers.DEFAULT_WORKERS)
    parser.add_argument("--cache", type=Path, default=peers.DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.rounds < 1 or args.workers < 1:
        parser.error(f"--rounds and --workers must be positive, got {args.rounds}, {args.workers}")
    (peer,) = [p for p in peers.PEERS if p.name == "sqlalchemy"]
    modules = SLICES[args.slice]
    if modules is not None:
        peer = dataclasses.replace(peer, modules=modules)
    tarball, source = peers.fetch_sdist(peer, args.cache.resolve())
    peers.install(peer, tarball)
    report: dict[str, Any] = {
        "peer": peer.name,
        "sdist": peer.sdist,
        "slice": args.slice,
        "modules": " ".join(peer.modules),
        "workers": args.workers,
        "rounds": args.rounds,
        "date": datetime.date.today().isoformat(),
        "loadavg_at_start": loadavg(),
    }
    report["figures"] = measure(peer, source, args.workers, args.rounds)
    report["loadavg_at_end"] = loadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer_wall.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render(report)
    (args.out / "peer_wall.md").write_text(markdown)
    print(markdown)
    return 1 if report["figures"]["differences"] else 0


if __name__ == "__main__":
    sys.exit(main())
