"""pytest-poolaware: an xdist scheduler that keeps PostgreSQL connections within a budget."""

from pytest_poolaware.shared.settings import ConfigError, PoolSettings

__all__ = ["ConfigError", "PoolSettings"]
