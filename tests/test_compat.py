"""The tested range of pytest and pytest-xdist: older is refused, newer runs with a warning."""

from __future__ import annotations

from pathlib import Path

import pytest
from inner import TWO_TESTS, run

from pytest_poolaware.shared import compat
from pytest_poolaware.shared.compat import INTERNALS, TESTED, check_versions, installed_version

OLDEST = {package: oldest for package, (oldest, _) in TESTED.items()}
NEWEST = {package: newest for package, (_, newest) in TESTED.items()}


def versions(**overrides: str) -> dict[str, str]:
    found = dict(NEWEST)
    found.update({name.replace("_", "-"): value for name, value in overrides.items()})
    return found


def test_the_tested_range_passes_silently() -> None:
    assert check_versions(OLDEST.get) == []
    assert check_versions(NEWEST.get) == []


def test_the_installed_versions_are_within_the_tested_range() -> None:
    """The environments of the matrix are pinned to its ends: a run of this suite in
    one of them must not warn (a newer pin is a reason to update ``TESTED``)."""
    assert check_versions() == []


def test_a_bug_fix_release_after_the_newest_tested_passes_silently() -> None:
    major, minor, _ = NEWEST["pytest"].split(".")
    assert check_versions(versions(pytest=f"{major}.{minor}.99").get) == []


@pytest.mark.parametrize(
    ("package", "version"),
    [("pytest-xdist", "3.5.0"), ("pytest", "7.4.4"), ("pytest-xdist", "3.6.0rc1")],
)
def test_an_older_version_is_a_usage_error_naming_it(package: str, version: str) -> None:
    with pytest.raises(pytest.UsageError) as excinfo:
        check_versions(versions(**{package.replace("-", "_"): version}).get)
    message = str(excinfo.value)
    assert f"{package} {version} (needs >= {OLDEST[package]})" in message
    assert "pip install -U" in message


def test_every_older_package_is_named_at_once() -> None:
    with pytest.raises(pytest.UsageError) as excinfo:
        check_versions({"pytest": "7.0.0", "pytest-xdist": "2.5.0"}.get)
    assert "pytest 7.0.0" in str(excinfo.value)
    assert "pytest-xdist 2.5.0" in str(excinfo.value)


def test_a_newer_minor_or_major_warns_in_one_line_each() -> None:
    lines = check_versions(versions(pytest="99.0.0", pytest_xdist="3.99.1").get)
    assert lines == [
        f"pytest-poolaware: WARNING: pytest 99.0.0 is newer than tested (up to "
        f"{NEWEST['pytest']}); --dist poolaware relies on its internals, report any problem",
        f"pytest-poolaware: WARNING: pytest-xdist 3.99.1 is newer than tested (up to "
        f"{NEWEST['pytest-xdist']}); --dist poolaware relies on its internals, "
        "report any problem",
    ]


def test_an_unreadable_version_warns_instead_of_failing() -> None:
    (line,) = check_versions(versions(pytest_xdist="banana").get)
    assert "pytest-xdist's version 'banana'" in line


def test_a_missing_package_is_left_to_pip() -> None:
    assert check_versions({"pytest": NEWEST["pytest"]}.get) == []
    assert installed_version("no-such-distribution-poolaware") is None


def test_every_internal_names_a_tested_package_and_a_use() -> None:
    assert {internal.package for internal in INTERNALS} == set(TESTED)
    for internal in INTERNALS:
        modules = internal.used_in.split(" (")[0].split(", ")
        for module in modules:
            assert (Path(compat.__file__).parent.parent / module).is_file(), internal


# -- what a user sees ----------------------------------------------------------------------


def fake_distribution(pytester: pytest.Pytester, name: str, version: str) -> None:
    """Metadata of ``name`` at ``version`` ahead of the real one on the inner run's
    ``sys.path`` (its working directory comes first): what ``importlib.metadata`` reads."""
    info = pytester.mkdir(f"{name.replace('-', '_')}-{version}.dist-info")
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
    )


def test_an_older_xdist_fails_the_run_with_a_usage_error(pytester: pytest.Pytester) -> None:
    fake_distribution(pytester, "pytest-xdist", "3.5.0")
    pytester.makepyfile(TWO_TESTS)
    result = run(pytester, "-n", "2", "--dist", "poolaware")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: --dist poolaware: too old for pytest-poolaware: pytest-xdist 3.5.0 (needs >= *"]
    )
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


def test_an_older_xdist_changes_nothing_when_poolaware_is_not_selected(
    pytester: pytest.Pytester,
) -> None:
    fake_distribution(pytester, "pytest-xdist", "3.5.0")
    pytester.makepyfile(TWO_TESTS)
    run(pytester, "-n", "2", "--dist", "load").assert_outcomes(passed=2)


def test_a_newer_xdist_runs_with_a_one_line_warning(pytester: pytest.Pytester) -> None:
    fake_distribution(pytester, "pytest-xdist", "99.0.0")
    pytester.makepyfile(TWO_TESTS)
    result = run(pytester, "-n", "2", "--dist", "poolaware")
    result.assert_outcomes(passed=2)
    warnings = [line for line in result.stdout.lines if "newer than tested" in line]
    assert warnings == [
        f"pytest-poolaware: WARNING: pytest-xdist 99.0.0 is newer than tested (up to "
        f"{NEWEST['pytest-xdist']}); --dist poolaware relies on its internals, report any problem"
    ]
