"""The shape that sharing a server between runs finds hardest: serial tests of 7-8
connections (two runs cannot run theirs at once in a room of 13), one unmarked test of
12 (nearly the whole room), and many light tests that would overtake them."""

from __future__ import annotations

import pytest
from conftest import hold
from sqlalchemy import Engine


@pytest.mark.serial_only
class TestMigrations:
    @pytest.mark.parametrize("step", range(6))
    def test_migrate(self, engine: Engine, step: int) -> None:
        hold(engine, 7 + step % 2, 0.4)


def test_rebuild_everything(engine: Engine) -> None:
    hold(engine, 12, 0.5)


@pytest.mark.parametrize("n", range(200))
def test_light(engine: Engine, n: int) -> None:
    hold(engine, 1 + n % 2, 0.03)
