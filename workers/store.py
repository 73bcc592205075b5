"""The state-store writer: set/get/delete/clear task and asset state the way Airflow does.

``expires_at`` is computed at write time from the database's clock plus the retention, so the
writer and the cleanup share one clock. Reads treat an expired row as absent, even before the
cleanup has removed it.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Connection, Engine, and_, delete, or_, select
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement

from workers.db import now_expr, plus
from workers.exceptions import InvalidArgument, NotFound
from workers.schema import Tables
from workers.settings import Settings


class _Never:
    """Retention marker: the row never expires (expires_at NULL)."""

    _instance: _Never | None = None

    def __new__(cls) -> _Never:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEVER"


NEVER: Final = _Never()
Retention = dt.timedelta | _Never | None


@dataclass(frozen=True)
class TaskScope:
    """State of one task instance (a map index of it) in one dag run.

    ``map_index`` is Airflow 3.3's name and 3.4's compatibility name for ``region_index``;
    ``region_id`` (3.4 only) names the region, None being the legacy all-zero region, the one
    every 3.3 row and every unregioned 3.4 write lands in.
    """

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1
    region_id: uuid.UUID | None = None

    @property
    def region_index(self) -> int:
        return self.map_index


@dataclass(frozen=True)
class AssetScope:
    """State of one asset, named by id or by name and uri."""

    asset_id: int | None = None
    name: str | None = None
    uri: str | None = None

    def __post_init__(self) -> None:
        if self.asset_id is None and (self.name is None or self.uri is None):
            raise InvalidArgument("AssetScope needs asset_id, or both name and uri")


Scope = TaskScope | AssetScope


class BaseStateBackend:
    """What a state backend offers. Custom backends subclass this and override cleanup()."""

    def __init__(self, settings: Settings, engine: Engine | None = None,
                 tables: Tables | None = None) -> None:
        self.settings = settings

    def set(self, scope: Scope, key: str, value: str, *, retention: Retention = None) -> None:
        raise NotImplementedError

    def get(self, scope: Scope, key: str) -> str | None:
        raise NotImplementedError

    def delete(self, scope: Scope, key: str) -> None:
        raise NotImplementedError

    def clear(self, scope: Scope, *, all_map_indices: bool = False) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        """Remove expired state. The base does nothing, as upstream; the metastore backend is
        cleaned by statesweep's coordinator instead of this hook."""


class MetastoreStateBackend(BaseStateBackend):
    """State kept in the metadata database's task_state / asset_state tables."""

    def __init__(self, settings: Settings, engine: Engine | None = None,
                 tables: Tables | None = None) -> None:
        super().__init__(settings, engine, tables)
        if engine is None or tables is None:
            raise InvalidArgument("MetastoreStateBackend needs an engine and its tables")
        self.engine = engine
        self.tables = tables
        self.dialect = engine.dialect.name

    # --- expiry --------------------------------------------------------------------------------

    def _retention(self, retention: Retention) -> dt.timedelta | None:
        if retention is None:
            days = self.settings.default_retention_days
            return None if days == 0 else dt.timedelta(days=days)
        if isinstance(retention, _Never):
            return None
        if isinstance(retention, dt.timedelta):
            if retention < dt.timedelta(0):
                raise InvalidArgument(f"retention must not be negative, got {retention!r}")
            return retention
        raise InvalidArgument(f"retention must be a timedelta, NEVER or None, got {retention!r}")

    def _now(self) -> ColumnElement[Any] | dt.datetime:
        expr = now_expr(self.dialect)
        return dt.datetime.now(dt.UTC) if expr is None else expr

    def _expires(self, retention: dt.timedelta | None) -> ColumnElement[Any] | dt.datetime | None:
        if retention is None:
            return None
        now = self._now()
        if isinstance(now, dt.datetime):
            return now + retention
        return plus(self.dialect, now, retention)

    # --- scope resolution ----------------------------------------------------------------------

    def _dag_run_id(self, conn: Connection, scope: TaskScope) -> int:
        dr = self.tables.dag_run
        found = conn.execute(
            select(dr.c.id).where(dr.c.dag_id == scope.dag_id, dr.c.run_id == scope.run_id)
        ).scalar_one_or_none()
        if found is None:
            raise NotFound(f"dag run {scope.dag_id!r}/{scope.run_id!r} does not exist")
        return int(found)

    def _asset_id(self, conn: Connection, scope: AssetScope) -> int:
        a = self.tables.asset
        if scope.asset_id is not None:
            cond = a.c.id == scope.asset_id
            label = f"id {scope.asset_id}"
        else:
            cond = and_(a.c.name == scope.name, a.c.uri == scope.uri)
            label = f"name {scope.name!r} uri {scope.uri!r}"
        found = conn.execute(select(a.c.id).where(cond)).scalar_one_or_none()
        if found is None:
            raise NotFound(f"asset with {label} does not exist")
        return int(found)

    def _task_where(self, conn: Connection, scope: TaskScope) -> list[ColumnElement[bool]]:
        t = self.tables.task_state
        return [t.c.dag_run_id == self._dag_run_id(conn, scope), t.c.task_id == scope.task_id]

    def _index_where(self, scope: TaskScope) -> list[ColumnElement[bool]]:
        """One map index (one region's, on 3.4) of the task's state."""
        cols = self._scope_columns(scope)
        return [self.tables.task_state.c[name] == value for name, value in cols.items()]

    def _scope_columns(self, scope: TaskScope) -> dict[str, Any]:
        try:
            return self.tables.scope_columns(scope.map_index, scope.region_id)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None

    # --- API -----------------------------------------------------------------------------------

    def set(self, scope: Scope, key: str, value: str, *, retention: Retention = None) -> None:
        if not isinstance(value, str):
            raise InvalidArgument(f"value must be a str, got {type(value).__name__}")
        with self.engine.begin() as conn:
            if isinstance(scope, TaskScope):
                expires = self._expires(self._retention(retention))
                t = self.tables.task_state
                row = {
                    "dag_run_id": self._dag_run_id(conn, scope), "task_id": scope.task_id,
                    **self._scope_columns(scope), "key": key, "dag_id": scope.dag_id,
                    "run_id": scope.run_id, "value": value, "updated_at": self._now(),
                    "expires_at": expires,
                }
                conn.execute(self._upsert(t, row, self.tables.task_key,
                                          ("value", "updated_at", "expires_at")))
            else:
                if retention is not None:
                    raise InvalidArgument("asset state has no expiry; pass no retention")
                a = self.tables.asset_state
                row = {"asset_id": self._asset_id(conn, scope), "key": key, "value": value,
                       "updated_at": self._now()}
                conn.execute(self._upsert(a, row, ("asset_id", "key"), ("value", "updated_at")))

    def _upsert(self, table: Any, row: dict[str, Any], keys: tuple[str, ...],
                update: tuple[str, ...]) -> Any:
        if self.dialect == "postgresql":
            pg = postgresql.insert(table).values(**row)
            return pg.on_conflict_do_update(
                index_elements=list(keys), set_={c: pg.excluded[c] for c in update}
            )
        if self.dialect in ("mysql", "mariadb"):
            my = mysql.insert(table).values(**row)
            return my.on_duplicate_key_update({c: my.inserted[c] for c in update})
        lite = sqlite.insert(table).values(**row)
        return lite.on_conflict_do_update(
            index_elements=list(keys), set_={c: lite.excluded[c] for c in update}
        )

    def get(self, scope: Scope, key: str) -> str | None:
        with self.engine.connect() as conn:
            if isinstance(scope, TaskScope):
                t = self.tables.task_state
                now = self._now()
                stmt = select(t.c.value).where(
                    *self._task_where(conn, scope), *self._index_where(scope), t.c.key == key,
                    # Expired means expires_at < now, the same predicate the cleanup uses.
                    or_(t.c.expires_at.is_(None), t.c.expires_at >= now),
                )
            else:
                a = self.tables.asset_state
                stmt = select(a.c.value).where(
                    a.c.asset_id == self._asset_id(conn, scope), a.c.key == key
                )
            found = conn.execute(stmt).scalar_one_or_none()
        return None if found is None else str(found)

    def delete(self, scope: Scope, key: str) -> None:
        with self.engine.begin() as conn:
            if isinstance(scope, TaskScope):
                t = self.tables.task_state
                conn.execute(delete(t).where(
                    *self._task_where(conn, scope), *self._index_where(scope), t.c.key == key,
                ))
            else:
                a = self.tables.asset_state
                conn.execute(delete(a).where(
                    a.c.asset_id == self._asset_id(conn, scope), a.c.key == key
                ))

    def clear(self, scope: Scope, *, all_map_indices: bool = False) -> None:
        with self.engine.begin() as conn:
            if isinstance(scope, TaskScope):
                t = self.tables.task_state
                where = self._task_where(conn, scope)
                if not all_map_indices:
                    where.extend(self._index_where(scope))
                conn.execute(delete(t).where(*where))
            else:
                a = self.tables.asset_state
                conn.execute(delete(a).where(a.c.asset_id == self._asset_id(conn, scope)))


def load_backend(settings: Settings, engine: Engine | None = None,
                 tables: Tables | None = None) -> BaseStateBackend:
    """Instantiate the configured backend class (settings already checked it imports)."""
    from workers.settings import import_string

    if settings.airflow_custom_backend:
        # Airflow's own class, which lives in Airflow's environment: its state is elsewhere,
        # and upstream's base cleanup() does nothing for it, so neither does statesweep.
        return BaseStateBackend(settings, engine, tables)
    cls = import_string(settings.state_backend)
    backend = cls(settings, engine, tables)
    if not callable(getattr(backend, "cleanup", None)):
        raise InvalidArgument(f"{settings.state_backend} has no cleanup() method")
    return backend  # type: ignore[no-any-return]
