"""Storage for the cloud: one :class:`~cloud.store.registry.Registry` interface, two backends.

``sqlite:///path`` opens :class:`~cloud.store.database.SqliteDatabase` (aiosqlite,
WAL, checkpoints run by the maintenance task, not on the request path);
``postgresql://…`` opens :class:`~cloud.store.database.PostgresDatabase`
(asyncpg pool). Both run the same SQL and the same migrations
(:mod:`cloud.store.schema`).
"""

from cloud.store.database import Database, open_database
from cloud.store.registry import Registry, open_registry

__all__ = ["Database", "Registry", "open_database", "open_registry"]
