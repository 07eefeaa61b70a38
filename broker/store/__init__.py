"""The broker's store: SQLite (the embedded default, one machine) or PostgreSQL (any number of
replicas) behind one interface, `Store`, whose write `Transaction` is what grants/ uses. One
schema and one migration path for both (`schema`). `open_store` picks one from the settings;
nothing else in the broker needs to know which."""

from __future__ import annotations

from ..config import Settings
from .base import GRANT_COLUMNS, Store, Transaction
from .schema import SCHEMA_VERSION
from .sqlite import SqliteStore

__all__ = ["GRANT_COLUMNS", "SCHEMA_VERSION", "SqliteStore", "Store", "Transaction", "open_store"]


def open_store(settings: Settings) -> Store:
    """`[storage] url` (postgresql://...) when set, else the SQLite file at `[storage] path`."""
    storage = settings.storage
    if storage["url"]:
        from .postgres import PostgresStore  # psycopg_pool only where PostgreSQL is used

        return PostgresStore(storage["url"], pool_size=storage["pool_size"])
    return SqliteStore(settings.database_path, synchronous=storage["synchronous"])
