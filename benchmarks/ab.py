"""A/B benchmark: two installs of the plugin side by side, in interleaved rounds.

    python benchmarks/ab.py --base BASE_PYTHON --head HEAD_PYTHON \\
            [--rounds N] [--only demo,overhead]

BASE_PYTHON and HEAD_PYTHON are interpreters of two environments, each with one version
of the plugin (and the demo's drivers) installed, e.g. a virtualenv made from the commit
before a change and one from after it. Every round runs, for each side in turn (the side
that goes first alternates), the measurements below; the figures compared are ratios
measured within one side and one round, so a noisy minute on a shared machine hits both
sides alike. The demo suite and the admin DSN are shared; each side keeps its own
pytest cache (warm runs follow a cold run of the same side).

- ``demo``: the demo suite against a role with ``CONNECTION LIMIT 16``, budget 15
  (``PG_POOL_SIZE=5 PG_MAX_OVERFLOW=10``), W=4: ``--dist poolaware`` warm and the
  two-pass split (``-m serial_only -n 0`` then ``-m "not serial_only" -n 4 --dist load``);
  ratio poolaware-warm / two-pass.
- ``overhead``: 3000 trivial tests, ``-n 2``: ratio poolaware / load.

Prints a Markdown table of the per-round ratios, their medians and head minus base, and
writes it with the raw walls to ``--out`` (default ``benchmarks/results/ab.{md,json}``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

HERE: Final = Path(__file__).resolve().parent
SUITE: Final = HERE.parent / "demo" / "suite"
DEFAULT_OUT: Final = HERE / "results"
ENV_DSN: Final = "POOLAWARE_DSN"
ROLE_LIMIT: Final = 16
POOL_ENV: Final = {"PG_POOL_SIZE": "5", "PG_MAX_OVERFLOW": "10"}
WORKERS: Final = "4"
OVERHEAD_TESTS: Final = 3000
OVERHEAD_MODULES: Final = 30
OVERHEAD_WORKERS: Final = "2"
PASS_TIMEOUT: Final = 600.0
#: pytest's exit code when some tests failed (as opposed to a usage or internal error).
TESTS_FAILED: Final = 1
SIDES: Final = ("base", "head")
NO_MONITOR: Final = ("--poolaware-monitor", "off")


def run(
    python: str, args: Sequence[str], env: dict[str, str], log: Path, *, may_fail: bool = False
) -> float:
    """One pytest session; its wall time. A session that did not pass fails the benchmark,
    unless ``may_fail`` (the two-pass split's parallel pass hits connection errors: that is
    what it is measured for, its time still counts)."""
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(
            [python, "-m", "pytest", *args, "-q", "-p", "no:randomly"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=PASS_TIMEOUT,
        ).returncode
    wall = time.perf_counter() - start
    if code != 0 and not (may_fail and code == TESTS_FAILED):
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"{log.name}: pytest exited {code}\n{tail}")
    return wall


def demo_round(python: str, side: str, env: dict[str, str], work: Path, n: int) -> float:
    """poolaware-warm / two-pass for one side in one round."""
    cache = ("-o", f"cache_dir={work / ('cache-demo-' + side)}")
    warm = run(
        python,
        [str(SUITE), *cache, "-n", WORKERS, "--dist", "poolaware", *NO_MONITOR],
        env,
        work / f"demo-warm-{side}-{n}.log",
    )
    two = ("-o", f"cache_dir={work / ('cache-two-' + side)}")
    serial = run(
        python,
        [str(SUITE), *two, "-m", "serial_only", "-n", "0"],
        env,
        work / f"two1-{side}-{n}.log",
        may_fail=True,
    )
    fan = run(
        python,
        [str(SUITE), *two, "-m", "not serial_only", "-n", WORKERS, "--dist", "load"],
        env,
        work / f"two2-{side}-{n}.log",
        may_fail=True,
    )
    return warm / (serial + fan)


def overhead_round(python: str, side: str, suite: Path, work: Path, n: int) -> float:
    env = dict(os.environ)
    walls = {}
    for dist in ("load", "poolaware"):
        extra = NO_MONITOR if dist == "poolaware" else ()
        walls[dist] = run(
            python,
            [
                str(suite),
                "-o",
                f"cache_dir={work / ('cache-oh-' + side + dist)}",
                "-n",
                OVERHEAD_WORKERS,
                "--dist",
                dist,
                *extra,
            ],
            env,
            work / f"oh-{dist}-{side}-{n}.log",
        )
    return walls["poolaware"] / walls["load"]


def write_overhead_suite(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    per = OVERHEAD_TESTS // OVERHEAD_MODULES
    for m in range(OVERHEAD_MODULES):
        (root / f"test_m{m:02}.py").write_text(
            "import pytest\n\n"
            f"@pytest.mark.parametrize('i', range({per}))\n"
            "def test_trivial(i):\n    assert i >= 0\n"
        )
    return root


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--base", required=True, help="python of the environment before")
    parser.add_argument("--head", required=True, help="python of the environment after")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="demo,overhead")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    pythons = {"base": args.base, "head": args.head}
    ratios: dict[str, dict[str, list[float]]] = {b: {s: [] for s in SIDES} for b in only}
    from poolaware_testserver import create_role, drop_role, postgres_dsn

    role = f"poolaware_ab_{os.getpid()}"
    with (
        postgres_dsn() as admin,
        tempfile.TemporaryDirectory(prefix="poolaware-ab-") as tmp,
    ):
        work = Path(tmp)
        oh_suite = write_overhead_suite(work / "overhead-suite")
        role_dsn = create_role(admin, role, connection_limit=ROLE_LIMIT)
        demo_env = {**os.environ, **POOL_ENV, ENV_DSN: role_dsn}
        try:
            if "demo" in only:
                for side in SIDES:  # cold runs fill each side's cache
                    run(
                        pythons[side],
                        [
                            str(SUITE),
                            "-o",
                            f"cache_dir={work / ('cache-demo-' + side)}",
                            "-n",
                            WORKERS,
                            "--dist",
                            "poolaware",
                            *NO_MONITOR,
                        ],
                        demo_env,
                        work / f"demo-cold-{side}.log",
                    )
            for n in range(args.rounds):
                order = SIDES if n % 2 == 0 else SIDES[::-1]
                for side in order:
                    print(f"[ab] round {n + 1}/{args.rounds} {side}", file=sys.stderr, flush=True)
                    if "demo" in only:
                        ratios["demo"][side].append(
                            demo_round(pythons[side], side, demo_env, work, n)
                        )
                    if "overhead" in only:
                        ratios["overhead"][side].append(
                            overhead_round(pythons[side], side, oh_suite, work, n)
                        )
        finally:
            drop_role(admin, role)
    lines = [
        "| benchmark | side | per-round ratios | median |",
        "|---|---|---|---:|",
    ]
    summary = {}
    for bench, sides in ratios.items():
        for side, values in sides.items():
            lines.append(
                f"| {bench} | {side} | {[round(v, 3) for v in values]} | {median(values):.3f} |"
            )
        delta = median(sides["head"]) - median(sides["base"])
        summary[bench] = delta
        lines.append(f"| {bench} | head - base | | {delta:+.3f} |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ab.md").write_text(text)
    (args.out / "ab.json").write_text(json.dumps({"ratios": ratios, "delta": summary}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
