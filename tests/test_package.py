"""The release artifacts and the version claims: what ``pip install`` and PyPI would see.

Building needs ``build`` and ``twine`` (``tox -e package``); the claims are checked everywhere.
"""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from pytest_poolaware.shared.compat import TESTED

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
NAME = PROJECT["name"].replace("-", "_")
VERSION = PROJECT["version"]
#: Bound on one build of both artifacts (it may fetch setuptools into an isolated env).
BUILD_TIMEOUT = 600


def pins(name: str) -> dict[str, str]:
    """``package==version`` lines of ``constraints/<name>.txt``, by normalized name."""
    found = {}
    for line in (ROOT / "constraints" / f"{name}.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            package, _, version = line.partition("==")
            found[package.lower()] = version
    return found


def declared_bounds() -> dict[str, str]:
    """The lower bound of each dependency and extra's requirement in pyproject.toml."""
    requirements = list(PROJECT["dependencies"])
    for extra in PROJECT["optional-dependencies"].values():
        requirements += extra
    bounds = {}
    for text in requirements:
        requirement = Requirement(text)
        for spec in requirement.specifier:
            if spec.operator == ">=":
                bounds[requirement.name.lower()] = spec.version
    return bounds


def matrix_pythons() -> list[str]:
    """The ``base_python`` of tox's oldest and newest environments, as ``3.10``."""
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    return [
        tox[f"testenv:{end}"]["base_python"].removeprefix("python") for end in ("oldest", "newest")
    ]


# -- the claims ------------------------------------------------------------------------------


def test_lower_bounds_are_what_the_oldest_environment_installs() -> None:
    """pyproject.toml claims no version that ``tox -e oldest`` does not install."""
    oldest, bounds = pins("oldest"), declared_bounds()
    runtime = ("pytest", "pytest-xdist", "execnet", "packaging", "sqlalchemy")
    drivers = ("asyncpg", "greenlet", "psycopg", "psycopg-pool", "psycopg2-binary", "pg8000")
    assert set(runtime + drivers) <= set(bounds)
    for package in runtime + drivers:
        assert Version(oldest[package]) == Version(bounds[package]), package


def test_the_tested_range_of_internals_is_the_matrix() -> None:
    oldest, newest = pins("oldest"), pins("newest")
    for package, (low, high) in TESTED.items():
        assert (oldest[package], newest[package]) == (low, high), package


def test_classifiers_and_requires_python_name_the_matrix() -> None:
    first, last = matrix_pythons()
    assert PROJECT["requires-python"] == f">={first}"
    named = sorted(
        (c.rsplit(" ", 1)[1] for c in PROJECT["classifiers"] if re.fullmatch(r".*:: 3\.\d+", c)),
        key=lambda v: tuple(map(int, v.split("."))),
    )
    assert named[0] == first
    assert named[-1] == last
    assert "Framework :: Pytest" in PROJECT["classifiers"]


def test_the_changelog_starts_at_the_current_version() -> None:
    headings = re.findall(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert headings
    assert headings[0] == VERSION


# -- the artifacts ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist, and the wheel built from it, as ``python -m build`` makes them."""
    pytest.importorskip("build", reason="tox -e package builds the artifacts")
    pytest.importorskip("twine", reason="tox -e package checks the artifacts")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=BUILD_TIMEOUT,
    )
    return out


def only(dist: Path, pattern: str) -> Path:
    (path,) = dist.glob(pattern)
    return path


@pytest.mark.e2e
def test_twine_check_passes(dist: Path) -> None:
    artifacts = sorted(str(path) for path in dist.iterdir())
    assert len(artifacts) == 2
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *artifacts],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2


@pytest.mark.e2e
def test_the_wheel_holds_only_the_plugin(dist: Path) -> None:
    wheel = only(dist, f"{NAME}-{VERSION}-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = Parser().parsestr(archive.read(f"{NAME}-{VERSION}.dist-info/METADATA").decode())
        entry_points = archive.read(f"{NAME}-{VERSION}.dist-info/entry_points.txt").decode()
    info = f"{NAME}-{VERSION}.dist-info/"
    plugin = sorted(n for n in names if not n.startswith(info))
    sources = ROOT / "src" / "pytest_poolaware"
    assert plugin == sorted(
        f"pytest_poolaware/{p.relative_to(sources).as_posix()}"
        for p in sources.rglob("*")
        if p.suffix in (".py", ".typed") and "__pycache__" not in p.parts
    )
    assert f"{info}licenses/LICENSE" in names
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Requires-Python"] == PROJECT["requires-python"]
    first, last = matrix_pythons()
    classifiers = metadata.get_all("Classifier") or []
    assert f"Programming Language :: Python :: {first}" in classifiers
    assert f"Programming Language :: Python :: {last}" in classifiers
    assert "[pytest11]\npoolaware = pytest_poolaware.plugin" in entry_points


@pytest.mark.e2e
def test_the_sdist_holds_the_tests_license_and_changelog(dist: Path) -> None:
    sdist = only(dist, f"{NAME}-{VERSION}.tar.gz")
    top = f"{NAME}-{VERSION}/"
    with tarfile.open(sdist) as archive:
        names = {name.removeprefix(top) for name in archive.getnames()}
    for wanted in ("LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "tox.ini"):
        assert wanted in names
    assert {f"tests/{p.name}" for p in (ROOT / "tests").glob("*.py")} <= names
    assert {f"constraints/{p.name}" for p in (ROOT / "constraints").glob("*.txt")} <= names
    assert {
        f"src/pytest_poolaware/{p.name}" for p in (ROOT / "src/pytest_poolaware").glob("*.py")
    } <= names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
