"""Fixtures of the harder sharing suite: one session-wide engine per worker, built by
``pytest_poolaware.engine`` from ``POOLAWARE_DSN`` and PG_POOL_SIZE / PG_MAX_OVERFLOW /
PG_POOL_TIMEOUT, and ``hold``: check out some connections at once for a while."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Final

import pytest
from sqlalchemy import Engine, text

from pytest_poolaware.engine import make_engine

ENV_DSN: Final = "POOLAWARE_DSN"


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    value = os.environ.get(ENV_DSN, "")
    if not value:
        pytest.fail(
            f"{ENV_DSN} is not set: run it with `python benchmarks/shared.py --suite harder`"
        )
    made = make_engine(value)
    yield made
    made.dispose()


def hold(engine: Engine, connections: int, seconds: float) -> None:
    """Hold ``connections`` at once, each busy on the server for ``seconds``."""
    with ExitStack() as stack:
        opened = [stack.enter_context(engine.connect()) for _ in range(connections)]
        for conn in opened:
            conn.execute(text("SELECT pg_sleep(:s)"), {"s": seconds / connections})
