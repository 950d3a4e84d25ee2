"""DSNs shown without their password, and rewritten for another role."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from pytest_poolaware.shared.dsn import mask_dsn, with_credentials


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://u:s3cret@h:5/db", "postgresql://u:***@h:5/db"),
        ("postgresql://u@h/db?sslmode=require", "postgresql://u@h/db?sslmode=require"),
        ("postgresql://u@h/db?password=s3cret&x=1", "postgresql://u@h/db?password=***&x=1"),
        ("host=h password='unterminated", "***"),
    ],
)
def test_mask_dsn(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked


def test_mask_keyword_dsn() -> None:
    masked = mask_dsn("host=h user=u password='s3 cret'")
    assert conninfo_to_dict(masked) == {"host": "h", "user": "u", "password": "***"}


@pytest.mark.parametrize(
    ("dsn", "password", "expected"),
    [
        ("postgresql://admin:pw@h:5/db", None, "postgresql://r%20%22x%22@h:5/db"),
        ("postgresql://admin@h/db", "p@ss:/w", "postgresql://r%20%22x%22:p%40ss%3A%2Fw@h/db"),
        (
            "postgresql://h/db?user=admin&password=pw&sslmode=require",
            None,
            "postgresql://r%20%22x%22@h/db?sslmode=require",
        ),
    ],
)
def test_with_credentials_url(dsn: str, password: str | None, expected: str) -> None:
    assert with_credentials(dsn, 'r "x"', password) == expected


def test_with_credentials_keywords() -> None:
    rewritten = with_credentials("host=h user=admin password=pw dbname=d", "r", "s3 cret")
    assert conninfo_to_dict(rewritten) == {
        "host": "h",
        "user": "r",
        "password": "s3 cret",
        "dbname": "d",
    }
    without = with_credentials("host=h user=admin password=pw", "r", None)
    assert conninfo_to_dict(without) == {"host": "h", "user": "r"}
