"""The SQL store (SQLAlchemy Core): SQLite by default, any URL by configuration.

Tables: ``devices``, ``readings`` (one column per signal of the schema), ``windows``
(every scored window), ``anomalies`` (with their explanation), ``alerts`` (every
transition) and ``deadletters`` (every refused payload or reading, as published on the
dead-letter topic, so "stored or dead-lettered" can be checked in one place).
Writes are idempotent: unique keys plus insert-or-ignore, so a reading
delivered twice is stored once and a CSV ingested twice adds nothing.
Times are stored as epoch seconds (REAL), UTC.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError, SQLAlchemyError

from itap_stream.core.readings import Block, Reading
from itap_stream.core.schema import SensorSchema
from itap_stream.errors import StoreError

__all__ = ["Store", "StoreBatch", "StoreWriteError", "StoreWriter"]

log = logging.getLogger(__name__)

#: Column order of `StoreBatch.windows` rows.
WINDOW_COLUMNS = ("device_id", "window_start", "window_end", "state", "score", "is_anomaly", "label")
#: How often ``devices.last_seen`` is brought up to date.
DEVICES_FLUSH_S = 5.0
#: Column widths of the dead-letter table (a hostile topic or device id is cut to fit).
DEADLETTER_TOPIC_CHARS, DEADLETTER_REASON_CHARS, DEADLETTER_ID_CHARS = 256, 32, 128
#: The parts of a `StoreBatch` that `StoreWriter` splits when the store refuses a row.
BATCH_PARTS = ("readings", "blocks", "new_blocks", "late", "windows", "anomalies", "alerts", "deadletters", "gaps",
               "state", "silences", "devices")
#: The columns of a `StoreBatch.blocks` record (`block_record`), in order.
BLOCK_COLUMNS = ("device_id", "ts_first", "ts_last", "n", "ts", "state", "seq", "label", "vals")


class StoreWriteError(StoreError):
    """A write the store refused. ``transient``: the store itself failed (locked, full,
    connection lost) and the same write may succeed later; otherwise a row of the batch
    was refused (a value out of a column's range or width, bad text) and retrying the
    same rows can never succeed."""

    def __init__(self, msg: str, *, transient: bool) -> None:
        super().__init__(msg)
        self.transient = transient


def _is_transient(exc: BaseException) -> bool:
    """The store failed (and may recover), rather than refused the data."""
    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def clean_text(value: Any, limit: int) -> str:
    """``value`` as text any SQL store accepts: valid Unicode (lone surrogates replaced),
    no NUL (PostgreSQL refuses it), at most ``limit`` characters.

    Examples
    --------
    >>> clean_text("a" + chr(0) + "b" + chr(0xD800), 10)
    'a\ufffdb?'
    >>> clean_text("x" * 300, 256) == "x" * 255 + "…"
    True
    """
    text = value if isinstance(value, str) else str(value)
    text = text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def deadletter_row(d: Mapping[str, Any]) -> dict[str, Any]:
    """A dead-letter body as a row every store takes, whatever a device put in it."""
    device = d.get("device_id")
    return {
        "received_at": float(d.get("received_at") or 0.0),
        "topic": clean_text(d.get("topic") or "", DEADLETTER_TOPIC_CHARS),
        "reason": clean_text(d.get("reason") or "", DEADLETTER_REASON_CHARS),
        "device_id": clean_text(device, DEADLETTER_ID_CHARS) if device is not None else None,
        "detail": clean_text(d.get("detail"), 1 << 16) if d.get("detail") is not None else None,
        "payload": clean_text(d.get("payload") or "", 1 << 16),
    }


@dataclass
class StoreBatch:
    """Rows of one micro-batch, written in one transaction."""

    readings: list[Any] = field(default_factory=list)  # tuples in Store.reading_columns order, or mappings
    blocks: list[tuple[Any, ...]] = field(default_factory=list)  # `block_record`s: readings stored column-wise
    # `block_record`s of devices this consumer has no history of (first heard since its start):
    # stored as blocks only when nothing stored overlaps them, else as ``late`` rows
    new_blocks: list[tuple[Any, ...]] = field(default_factory=list)
    # rows like ``readings`` that may repeat a reading already stored in a block (a device's
    # late, out-of-order or repeated readings): stored only when no block holds them
    late: list[Any] = field(default_factory=list)
    windows: list[Any] = field(default_factory=list)  # tuples in WINDOW_COLUMNS order, or mappings
    anomalies: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    deadletters: list[dict[str, Any]] = field(default_factory=list)  # dead-letter bodies
    gaps: list[dict[str, Any]] = field(default_factory=list)  # jumps in a device's seq (`core.window.Gap`)
    state: list[tuple[str, str]] = field(default_factory=list)  # (key, value) of the service's own state
    silences: list[tuple[str, str | None]] = field(default_factory=list)  # (id, JSON body or None: removed)
    devices: dict[str, tuple[float, float]] = field(default_factory=dict)  # id -> (first, last) ts
    on_commit: list[Any] = field(default_factory=list)  # callables run after the commit

    def __len__(self) -> int:
        return (len(self.readings) + sum(b[3] for b in self.blocks) + sum(b[3] for b in self.new_blocks)
                + len(self.late) + len(self.windows)
                + len(self.anomalies) + len(self.alerts) + len(self.deadletters) + len(self.gaps) + len(self.state)
                + len(self.silences))


class Store:
    """Owns the engine and the table definitions for one sensor schema.

    Examples
    --------
    >>> from itap_stream.core.schema import SensorSchema
    >>> schema = SensorSchema.from_dict({"signals": [{"name": "rpm", "family": "RPM"}]})
    >>> store = Store("sqlite://", schema)
    >>> b = StoreBatch(readings=[{"device_id": "D1", "ts": 1.0, "state": "RUN", "rpm": 900.0}])
    >>> store.write(b), store.write(b)
    (1, 0)
    >>> store.count("readings")
    1
    """

    def __init__(self, url: str, schema: SensorSchema, *, must_exist: bool = False) -> None:
        """``must_exist``: a read-only command's store; a SQLite file that is not there is
        `StoreError` ("no such database: PATH") instead of a new, empty database."""
        self.url = url
        self.schema = schema
        if must_exist:
            path = _sqlite_file(url)
            if path is not None and not Path(path).is_file():
                msg = (f"no such database: {path} (check the path in {_safe_url(url)}; `itap run` or `itap ingest` "
                       "make one)")
                raise StoreError(msg)
        try:
            self.engine: Engine = sa.create_engine(_with_installed_driver(url), future=True)
        except (SQLAlchemyError, ValueError, ImportError) as exc:
            msg = f"cannot use database URL {_safe_url(url)}: {exc}"
            raise StoreError(msg) from exc
        self.dialect = self.engine.dialect.name
        if self.dialect not in ("sqlite", "postgresql"):
            # writes must be insert-or-ignore: a reading delivered again would otherwise fail its
            # batch for ever
            msg = f"database {self.dialect!r} is not supported ({_safe_url(url)}): use SQLite or PostgreSQL"
            raise StoreError(msg)
        if self.dialect == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        md = sa.MetaData()
        self.devices = sa.Table(
            "devices",
            md,
            sa.Column("device_id", sa.String(128), primary_key=True),
            sa.Column("first_seen", sa.Float, nullable=False),
            sa.Column("last_seen", sa.Float, nullable=False),
        )
        self.readings = sa.Table(
            "readings",
            md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("device_id", sa.String(128), nullable=False),
            sa.Column("ts", sa.Float, nullable=False),
            sa.Column("state", sa.String(8), nullable=False),
            sa.Column("seq", sa.BigInteger),
            sa.Column("tag", sa.String(64)),
            sa.Column("label", sa.String(64)),
            *[sa.Column(name, sa.Float) for name in schema.names],
            sa.UniqueConstraint("device_id", "ts", name="uq_readings_device_ts"),
        )
        # readings of clean array payloads, one row per payload with its columns as JSON
        # arrays (BLOCK_COLUMNS); the view ``readings_all`` shows them as rows beside ``readings``.
        # A device's blocks never overlap (a block is stored whole only when all of it is later
        # than everything the device sent before), so its unique index also finds the one
        # block that could hold a given time: the last one starting at or before it.
        self.reading_blocks = sa.Table(
            "reading_blocks",
            md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("device_id", sa.String(128), nullable=False),
            sa.Column("ts_first", sa.Float, nullable=False),
            sa.Column("ts_last", sa.Float, nullable=False),
            sa.Column("n", sa.Integer, nullable=False),
            sa.Column("ts", sa.Text, nullable=False),  # [epoch seconds, ...], rising
            sa.Column("state", sa.Text, nullable=False),  # ["RUN", ...]
            sa.Column("seq", sa.Text),  # [seq or null, ...]; NULL when no reading has one
            sa.Column("label", sa.Text),  # [label or null, ...]; NULL when no reading has one
            sa.Column("vals", sa.Text, nullable=False),  # [[value or null per signal, schema order], ...]
            sa.UniqueConstraint("device_id", "ts_first", name="uq_reading_blocks_device_first"),
        )
        self.windows = sa.Table(
            "windows",
            md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("device_id", sa.String(128), nullable=False),
            sa.Column("window_start", sa.Float, nullable=False),
            sa.Column("window_end", sa.Float, nullable=False),
            sa.Column("state", sa.String(8), nullable=False),
            sa.Column("score", sa.Float, nullable=False),
            sa.Column("is_anomaly", sa.Boolean, nullable=False),
            sa.Column("label", sa.String(64)),
            sa.UniqueConstraint("device_id", "window_end", name="uq_windows_device_end"),
        )
        self.anomalies = sa.Table(
            "anomalies",
            md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("device_id", sa.String(128), nullable=False),
            sa.Column("window_start", sa.Float, nullable=False),
            sa.Column("window_end", sa.Float, nullable=False),
            sa.Column("state", sa.String(8), nullable=False),
            sa.Column("score", sa.Float, nullable=False),
            sa.Column("confidence", sa.Float, nullable=False),
            sa.Column("dominant_family", sa.String(64), nullable=False),
            sa.Column("families", sa.Text, nullable=False),  # JSON {family: percent}
            sa.Column("top_features", sa.Text, nullable=False),  # JSON [[feature, percent], ...]
            sa.Column("tags", sa.Text),
            sa.Column("label", sa.String(64)),
            sa.UniqueConstraint("device_id", "window_end", name="uq_anomalies_device_end"),
        )
        self.alerts = sa.Table(
            "alerts",
            md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("alert_id", sa.String(64), nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("rule", sa.String(128), nullable=False),
            sa.Column("severity", sa.String(16), nullable=False),
            sa.Column("device_id", sa.String(128), nullable=False),
            sa.Column("route", sa.String(64)),
            sa.Column("root_cause", sa.String(256)),
            sa.Column("score", sa.Float),
            sa.Column("confidence", sa.Float),
            sa.Column("window_start", sa.Float),
            sa.Column("window_end", sa.Float),
            sa.Column("changed_at", sa.Float, nullable=False),
            sa.Column("payload", sa.Text, nullable=False),  # the published JSON
            # one row per transition: reminders repeat a status, at another time
            sa.UniqueConstraint("alert_id", "status", "changed_at", name="uq_alerts_id_status_at"),
        )
        # what the service must find again after a restart: the active model, runtime silences
        self.state = sa.Table(
            "state",
            md,
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("value", sa.Text, nullable=False),
            sa.Column("updated_at", sa.Float, nullable=False),
        )
        self.silences = sa.Table(
            "silences",
            md,
            sa.Column("id", sa.String(128), primary_key=True),
            sa.Column("body", sa.Text, nullable=False),  # the silence as `Silence.to_dict` gives it, JSON
            sa.Column("added_at", sa.Float, nullable=False),
        )
        # readings a device numbered (seq) that never arrived: one row per jump
        self.gaps = sa.Table(
            "gaps",
            md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("device_id", sa.String(128), nullable=False),
            sa.Column("seq_before", sa.BigInteger, nullable=False),
            sa.Column("seq_after", sa.BigInteger, nullable=False),
            sa.Column("missing", sa.BigInteger, nullable=False),
            sa.Column("ts_before", sa.Float, nullable=False),
            sa.Column("ts_after", sa.Float, nullable=False),
            sa.UniqueConstraint("device_id", "seq_after", "ts_after", name="uq_gaps_device_seq_ts"),
        )
        self.deadletters = sa.Table(
            "deadletters",
            md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("received_at", sa.Float, nullable=False),
            sa.Column("topic", sa.String(256), nullable=False),
            sa.Column("reason", sa.String(32), nullable=False),
            sa.Column("device_id", sa.String(128)),
            sa.Column("detail", sa.Text),
            sa.Column("payload", sa.Text, nullable=False),  # truncated to 1 KiB, as published
        )
        # readings, windows and anomalies are found by device through their unique
        # (device_id, time) index; a second index on device_id alone only slows inserts
        sa.Index("ix_alerts_device", self.alerts.c.device_id)
        self.metadata = md
        self.reading_columns: tuple[str, ...] = ("device_id", "ts", "state", "seq", "tag", "label", *schema.names)
        self.window_columns: tuple[str, ...] = WINDOW_COLUMNS
        self._devices_seen: dict[str, list[float]] = {}  # device -> [first, last] as stored or pending
        self._devices_dirty: set[str] = set()
        self._devices_flushed = time.monotonic()
        self._create()

    def _create(self) -> None:
        try:
            try:
                self.metadata.create_all(self.engine)
            except IntegrityError:
                # PostgreSQL: another consumer of a cluster made the same tables at this moment
                time.sleep(0.5)
                self.metadata.create_all(self.engine)
            insp = sa.inspect(self.engine)
            cols = {c["name"] for c in insp.get_columns("readings")}
            if set(self.schema.names) <= cols:
                self._create_view()
            alert_keys = [tuple(u["column_names"]) for u in insp.get_unique_constraints("alerts")]
        except SQLAlchemyError as exc:
            msg = (
                f"cannot open the store at {_safe_url(self.url)}: "
                f"{exc.__class__.__name__}: {exc.args[0] if exc.args else exc}"
            )
            raise StoreError(msg) from exc
        if ("alert_id", "status") in alert_keys:
            # created before alerts had one row per transition: a second reminder (or any
            # repeated status) of one alert would be dropped by the old unique key
            log.warning(
                "store %s keeps one row per alert and status (an older layout): repeated reminders of an alert "
                "are published but not all stored; start a new database to store every transition",
                _safe_url(self.url),
            )
        missing = [n for n in self.schema.names if n not in cols]
        if missing:
            msg = (
                f"store {_safe_url(self.url)} was created for another sensor schema: its readings table "
                f"lacks column(s) {missing}; use a new database for this schema"
            )
            raise StoreError(msg)

    def _create_view(self) -> None:
        """``readings_all``: every stored reading as a row, those of ``readings`` and those
        held column-wise in ``reading_blocks`` (for SQL by hand: the consumer reads the
        tables themselves)."""
        q = self.engine.dialect.identifier_preparer.quote
        names = [q(n) for n in self.schema.names]
        plain = f"SELECT device_id, ts, state, seq, tag, label, {', '.join(names)} FROM readings"
        if self.dialect == "sqlite":
            at = "'$[' || j.key || ']'"
            vals = [f"json_extract(b.vals, '$[' || j.key || '][{i}]') AS {n}" for i, n in enumerate(names)]
            blocks = (f"SELECT b.device_id, j.value, json_extract(b.state, {at}), json_extract(b.seq, {at}), NULL, "
                      f"json_extract(b.label, {at}), {', '.join(vals)} FROM reading_blocks b, json_each(b.ts) j")
            ddl = f"CREATE VIEW IF NOT EXISTS readings_all AS {plain} UNION ALL {blocks}"
        else:
            at = "(j.i - 1)::int"
            vals = [f"((b.vals::jsonb -> {at}) ->> {i})::float8 AS {n}" for i, n in enumerate(names)]
            blocks = (f"SELECT b.device_id, j.t::float8, b.state::jsonb ->> {at}, (b.seq::jsonb ->> {at})::bigint, "
                      f"NULL, b.label::jsonb ->> {at}, {', '.join(vals)} FROM reading_blocks b "
                      "CROSS JOIN LATERAL jsonb_array_elements_text(b.ts::jsonb) WITH ORDINALITY AS j(t, i)")
            ddl = f"CREATE OR REPLACE VIEW readings_all AS {plain} UNION ALL {blocks}"
        try:
            with self.engine.begin() as conn:
                conn.exec_driver_sql(ddl)
        except SQLAlchemyError as exc:  # a convenience for people: the service runs without it
            log.warning("could not create the view readings_all in %s: %s", _safe_url(self.url), _short(exc))

    def _insert_ignore(self, table: sa.Table) -> Any:
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            return sqlite_insert(table).on_conflict_do_nothing()
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table).on_conflict_do_nothing()
        msg = f"no insert-or-ignore for {self.dialect}"  # refused in __init__ already
        raise StoreError(msg)

    def _rows(self, table: sa.Table, columns: Sequence[str], rows: Sequence[Any]) -> list[tuple[Any, ...]]:
        if rows and isinstance(rows[0], Mapping):
            return [tuple(r.get(c) for c in columns) for r in rows]
        return list(rows)

    def _insert_rows(self, conn: sa.Connection, table: sa.Table, columns: Sequence[str], rows: Sequence[Any]) -> int:
        """Insert-or-ignore ``rows`` (tuples in ``columns`` order, or mappings); returns rows inserted.

        On SQLite the rows go to the driver's ``executemany`` as plain tuples: SQLAlchemy's
        per-row parameter processing costs more than SQLite's own insert.
        """
        tuples = self._rows(table, columns, rows)
        if self.dialect == "sqlite":
            sql = f"INSERT OR IGNORE INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            return conn.exec_driver_sql(sql, tuples).rowcount
        return conn.execute(self._insert_ignore(table), [dict(zip(columns, t, strict=True)) for t in tuples]).rowcount

    def write(self, batch: StoreBatch) -> int:
        """Write one micro-batch in one transaction; returns readings newly inserted."""
        inserted = 0
        try:
            with self.engine.begin() as conn:
                if batch.readings:
                    inserted = self._insert_rows(conn, self.readings, self.reading_columns, batch.readings)
                blocks, late = batch.blocks, batch.late
                if batch.new_blocks:
                    clear, overlapping = self._overlaps(conn, batch.new_blocks)
                    blocks, late = [*blocks, *clear], [*late, *overlapping]
                if blocks:
                    inserted += self._insert_blocks(conn, blocks)
                if late:
                    late = self._not_in_blocks(conn, self._rows(self.readings, self.reading_columns, late))
                    if late:
                        inserted += self._insert_rows(conn, self.readings, self.reading_columns, late)
                if batch.windows:
                    self._insert_rows(conn, self.windows, self.window_columns, batch.windows)
                for table, rows in ((self.anomalies, batch.anomalies), (self.alerts, batch.alerts),
                                    (self.gaps, batch.gaps)):
                    if rows:
                        conn.execute(self._insert_ignore(table), rows)
                if batch.deadletters:
                    conn.execute(self.deadletters.insert(), [deadletter_row(d) for d in batch.deadletters])
                now = time.time()
                for key, value in batch.state:
                    conn.execute(self.state.delete().where(self.state.c.key == key))
                    conn.execute(self.state.insert(), {"key": key, "value": value, "updated_at": now})
                for sid, body in batch.silences:
                    conn.execute(self.silences.delete().where(self.silences.c.id == sid))
                    if body is not None:
                        conn.execute(self.silences.insert(), {"id": sid, "body": body, "added_at": now})
                if batch.devices:
                    self._note_devices(conn, batch.devices)
        except (SQLAlchemyError, ValueError, TypeError, OverflowError, UnicodeError) as exc:
            # the drivers raise some refusals of a value themselves, before the database sees it:
            # sqlite3 an OverflowError for an integer over 64 bits, a UnicodeEncodeError for a
            # lone surrogate; psycopg2 a ValueError for a NUL in a string
            why = exc.orig if isinstance(exc, DBAPIError) else exc
            msg = f"store write failed ({_safe_url(self.url)}): {exc.__class__.__name__}: {_short(why)}"
            raise StoreWriteError(msg, transient=_is_transient(exc)) from exc
        return max(inserted, 0)

    def _insert_blocks(self, conn: sa.Connection, blocks: list[tuple[Any, ...]]) -> int:
        """Insert-or-ignore `block_record`s; returns the readings newly inserted (when only some
        blocks were new, which a consumer never sends: a repeated payload goes one reading at
        a time, their count at the batch's mean block size)."""
        n = self._insert_rows(conn, self.reading_blocks, BLOCK_COLUMNS, blocks)
        total = sum(b[3] for b in blocks)
        return total if n == len(blocks) else round(max(n, 0) * total / len(blocks))

    def _overlaps(self, conn: sa.Connection, records: list[tuple[Any, ...]]
                  ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Split `block_record`s into those nothing stored overlaps (stored as blocks) and the
        rows of the others (stored one by one, so that no reading is stored twice)."""
        r, b = self.readings, self.reading_blocks
        clear, rows = [], []
        for rec in records:
            device_id, first, last = rec[0], rec[1], rec[2]
            hit = conn.execute(sa.select(r.c.id).where(r.c.device_id == device_id, r.c.ts >= first, r.c.ts <= last)
                               .limit(1)).first() or conn.execute(
                sa.select(b.c.id).where(b.c.device_id == device_id, b.c.ts_first <= last, b.c.ts_last >= first)
                .limit(1)).first()
            if hit is None:
                clear.append(rec)
            else:
                rows.extend(reading_rows(_block_readings(device_id, *rec[4:])))
        return clear, rows

    def _not_in_blocks(self, conn: sa.Connection, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """``rows`` less those whose reading a stored block holds already."""
        b = self.reading_blocks
        out = []
        for row in rows:
            device_id, ts = row[0], row[1]
            held = conn.execute(
                sa.select(b.c.ts, b.c.ts_last).where(b.c.device_id == device_id, b.c.ts_first <= ts)
                .order_by(b.c.ts_first.desc()).limit(1)
            ).first()
            if held is None or ts > held[1] or ts not in orjson.loads(held[0]):
                out.append(row)
        return out

    def _note_devices(self, conn: sa.Connection, devices: Mapping[str, tuple[float, float]]) -> None:
        """Keep the devices table current: new devices at once, ``last_seen`` every few seconds.

        Updating ``last_seen`` of every device in every micro-batch would double the
        writes of a large fleet; the table is for operators, so a few seconds of lag is fine.
        """
        seen = self._devices_seen
        fresh = [d for d in devices if d not in seen]
        if fresh:
            stored = {}
            for chunk in range(0, len(fresh), 500):
                ids = fresh[chunk : chunk + 500]
                q = sa.select(self.devices).where(self.devices.c.device_id.in_(ids))
                stored.update({row.device_id: [row.first_seen, row.last_seen] for row in conn.execute(q)})
            new = [
                {"device_id": d, "first_seen": devices[d][0], "last_seen": devices[d][1]}
                for d in fresh
                if d not in stored
            ]
            if new:
                conn.execute(self._insert_ignore(self.devices), new)
            for d in fresh:
                seen[d] = stored.get(d) or [devices[d][0], devices[d][1]]
        dirty = self._devices_dirty
        for d, (first, last) in devices.items():
            span = seen[d]
            if first < span[0]:
                span[0] = first
                dirty.add(d)
            if last > span[1]:
                span[1] = last
                dirty.add(d)
        if dirty and time.monotonic() - self._devices_flushed >= DEVICES_FLUSH_S:
            self._flush_devices(conn)

    def _flush_devices(self, conn: sa.Connection) -> None:
        rows = [{"d": d, "f": self._devices_seen[d][0], "l": self._devices_seen[d][1]} for d in self._devices_dirty]
        if rows:
            conn.execute(
                self.devices.update()
                .where(self.devices.c.device_id == sa.bindparam("d"))
                .values(first_seen=sa.bindparam("f"), last_seen=sa.bindparam("l")),
                rows,
            )
        self._devices_dirty = set()
        self._devices_flushed = time.monotonic()

    def flush_devices(self) -> None:
        """Write pending ``last_seen`` updates now (the writer calls this when it stops)."""
        if not self._devices_dirty:
            return
        try:
            with self.engine.begin() as conn:
                self._flush_devices(conn)
        except SQLAlchemyError as exc:
            msg = f"store write failed ({_safe_url(self.url)}): {exc}"
            raise StoreError(msg) from exc

    def recent_readings(
        self, window: int, max_devices: int | None = None, keep: Callable[[str], bool] | None = None
    ) -> dict[str, tuple[list[Reading], int]]:
        """Per device: its last ``window`` stored readings (oldest first) and how many it has
        stored in all, to refill the ring buffers after a restart; with ``max_devices``, only
        that many devices, those heard from most recently; with ``keep``, only the devices
        it accepts (a cluster consumer's partitions)."""
        r, b = self.readings, self.reading_blocks
        out: dict[str, tuple[list[Reading], int]] = {}
        try:
            with self.engine.connect() as conn:
                # per device: readings stored in all (rows and blocks) and the latest time
                seen: dict[str, list[float]] = {}
                for device_id, n, last in conn.execute(
                        sa.select(r.c.device_id, sa.func.count(), sa.func.max(r.c.ts)).group_by(r.c.device_id)):
                    seen[device_id] = [int(n), float(last)]
                for device_id, n, last in conn.execute(
                        sa.select(b.c.device_id, sa.func.sum(b.c.n), sa.func.max(b.c.ts_last)).group_by(b.c.device_id)):
                    got = seen.setdefault(device_id, [0, float(last)])
                    got[0] += int(n)
                    got[1] = max(got[1], float(last))
                devices = sorted(seen, key=lambda d: -seen[d][1])
                if max_devices is not None:
                    devices = devices[:max_devices]
                cols = [r.c.ts, r.c.state, r.c.seq, r.c.tag, r.c.label, *[r.c[n] for n in self.schema.names]]
                for device_id in devices:
                    if keep is not None and not keep(device_id):
                        continue
                    rows = conn.execute(
                        sa.select(*cols).where(r.c.device_id == device_id).order_by(r.c.ts.desc()).limit(window)
                    ).all()
                    readings = [
                        Reading(device_id, float(row[0]), row[1],
                                tuple(float("nan") if v is None else float(v) for v in row[5:]), row[2], row[3], row[4])
                        for row in rows
                    ]
                    held = 0
                    for block in conn.execute(
                            sa.select(b.c.n, b.c.ts, b.c.state, b.c.seq, b.c.label, b.c.vals)
                            .where(b.c.device_id == device_id).order_by(b.c.ts_first.desc())):
                        readings.extend(_block_readings(device_id, *block[1:]))
                        held += block[0]
                        if held >= window:
                            break
                    readings.sort(key=lambda x: x.ts)
                    out[device_id] = (readings[-window:], int(seen[device_id][0]))
        except SQLAlchemyError as exc:
            msg = f"cannot read recent readings from {_safe_url(self.url)}: {exc}"
            raise StoreError(msg) from exc
        return out

    def operator_rebaselines(self) -> dict[str, list[float]]:
        """Per device, the event times (``window_end``) of the stored ``baseline_shift`` events
        an operator caused (`Processor.restore` applies them again after a restart)."""
        a = self.alerts
        out: dict[str, list[float]] = {}
        q = (sa.select(a.c.device_id, a.c.window_end)
             .where(a.c.rule == "baseline_shift", a.c.root_cause.like("baseline shift (operator)%"))
             .order_by(a.c.window_end))
        try:
            with self.engine.connect() as conn:
                for device_id, end in conn.execute(q):
                    if end is not None:
                        out.setdefault(device_id, []).append(float(end))
        except SQLAlchemyError as exc:
            msg = f"cannot read baseline shifts from {_safe_url(self.url)}: {exc}"
            raise StoreError(msg) from exc
        return out

    def get_state(self, key: str) -> tuple[str, float] | None:
        """A value of the service's own state and when it was written, or None."""
        try:
            with self.engine.connect() as conn:
                row = conn.execute(sa.select(self.state.c.value, self.state.c.updated_at)
                                   .where(self.state.c.key == key)).first()
        except SQLAlchemyError as exc:
            msg = f"cannot read the service state from {_safe_url(self.url)}: {exc}"
            raise StoreError(msg) from exc
        return None if row is None else (str(row[0]), float(row[1]))

    def stored_silences(self) -> list[dict[str, Any]]:
        """The silences added at runtime and not removed, oldest first."""
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(sa.select(self.silences.c.body).order_by(self.silences.c.added_at)).all()
        except SQLAlchemyError as exc:
            msg = f"cannot read silences from {_safe_url(self.url)}: {exc}"
            raise StoreError(msg) from exc
        out = []
        for (body,) in rows:
            try:
                item = json.loads(body)
            except ValueError:
                continue
            if isinstance(item, dict):
                out.append(item)
        return out

    def latest_windows(self, limit: int, per_device: int = 60) -> dict[str, list[tuple[float, bool, str]]]:
        """Per device (the ``limit`` heard from most recently), its latest ``per_device`` scored
        windows oldest first as ``(score, is_anomaly, state)``: the dashboard after a restart."""
        w = self.windows
        out: dict[str, list[tuple[float, bool, str]]] = {}
        try:
            with self.engine.connect() as conn:
                devices = conn.execute(sa.select(w.c.device_id).group_by(w.c.device_id)
                                       .order_by(sa.func.max(w.c.window_end).desc()).limit(limit)).scalars().all()
                for dev in devices:
                    rows = conn.execute(sa.select(w.c.score, w.c.is_anomaly, w.c.state).where(w.c.device_id == dev)
                                        .order_by(w.c.window_end.desc()).limit(per_device)).all()
                    out[dev] = [(float(s), bool(f), str(st)) for s, f, st in reversed(rows)]
        except SQLAlchemyError as exc:
            msg = f"cannot read recent windows from {_safe_url(self.url)}: {exc}"
            raise StoreError(msg) from exc
        return out

    def alert_device(self, alert_id: str) -> str | None:
        """The device of the stored alert with this id, or with this unique prefix of at
        least 6 characters; None when there is none or the prefix is ambiguous."""
        a = self.alerts
        exact_only = len(alert_id) < 6
        cond = a.c.alert_id == alert_id if exact_only else a.c.alert_id.startswith(alert_id, autoescape=True)
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(sa.select(a.c.alert_id, a.c.device_id).where(cond).distinct().limit(3)).all()
        except SQLAlchemyError as exc:
            msg = f"cannot look up alert {alert_id!r} in {_safe_url(self.url)}: {exc}"
            raise StoreError(msg) from exc
        exact = [r[1] for r in rows if r[0] == alert_id]
        if exact:
            return str(exact[0])
        return str(rows[0][1]) if len({r[0] for r in rows}) == 1 else None

    def open_alerts(self) -> list[Any]:
        """Alerts open when the service stopped: per alert id its latest stored transition
        (as an `Alert`, status ``flapping`` when it ever flapped) unless that is ``resolved``;
        events (``model_drift``, ``baseline_shift``, ``data_gap``) are never open."""
        from itap_stream.core.rules import Alert

        a = self.alerts
        latest = sa.select(sa.func.max(a.c.id)).where(a.c.status != "event").group_by(a.c.alert_id)
        flapped = sa.select(a.c.alert_id).where(a.c.status == "flapping").distinct()
        out = []
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(sa.select(a.c.payload, a.c.window_start, a.c.window_end, a.c.changed_at)
                                    .where(a.c.id.in_(latest), a.c.status != "resolved")
                                    .order_by(a.c.changed_at)).all()
                flapping = {r[0] for r in conn.execute(flapped)}
        except SQLAlchemyError as exc:
            msg = f"cannot read open alerts from {_safe_url(self.url)}: {exc}"
            raise StoreError(msg) from exc
        for payload, start, end, changed in rows:
            try:
                alert = Alert.from_dict(json.loads(payload))
            except (ValueError, KeyError, TypeError):
                log.warning("an open alert's stored transition cannot be read back; it is not restored")
                continue
            alert.window_start, alert.window_end, alert.changed_at = float(start), float(end), float(changed)
            if alert.id in flapping:
                alert.status = "flapping"
            out.append(alert)
        return out

    def missing_readings(self) -> dict[str, int]:
        """Per device, the readings its ``seq`` says never arrived (the sum of its gaps)."""
        g = self.gaps
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(sa.select(g.c.device_id, sa.func.sum(g.c.missing)).group_by(g.c.device_id)).all()
        except SQLAlchemyError as exc:
            msg = f"cannot read gaps from {_safe_url(self.url)}: {exc}"
            raise StoreError(msg) from exc
        return {d: int(n) for d, n in rows}

    def count(self, table: str, **where: Any) -> int:
        """Rows of ``table`` whose columns equal ``where``; for ``readings``, every stored
        reading (those held in ``reading_blocks`` too)."""
        t = self.metadata.tables[table]
        q = sa.select(sa.func.count()).select_from(t)
        for k, v in where.items():
            q = q.where(t.c[k] == v)
        with self.engine.connect() as conn:
            n = int(conn.execute(q).scalar_one())
            if table != "readings":
                return n
            b = self.reading_blocks
            mine = [b.c.device_id == where["device_id"]] if "device_id" in where else []
            rest = {k: v for k, v in where.items() if k != "device_id"}
            if not rest:
                return n + int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(b.c.n), 0)).where(*mine))
                               .scalar_one())
            names = self.reading_columns
            for row in conn.execute(sa.select(b.c.device_id, b.c.ts, b.c.state, b.c.seq, b.c.label, b.c.vals)
                                    .where(*mine)):
                for values in reading_rows(_block_readings(*row)):
                    d = dict(zip(names, values, strict=True))
                    n += all(d[k] == v for k, v in rest.items())
            return n

    def read_frame(self, table: str, *, since: float | None = None, until: float | None = None) -> pd.DataFrame:
        """A whole table (optionally a time range) as a DataFrame, in insertion order; for
        ``readings`` with readings held in ``reading_blocks`` too, all of them in time order
        (without the ``id`` column)."""
        t = self.metadata.tables[table]
        tcol = (t.c.ts if "ts" in t.c else t.c.window_end if "window_end" in t.c
                else t.c.received_at if "received_at" in t.c else t.c.changed_at)
        q = sa.select(t).order_by(t.c.id) if "id" in t.c else sa.select(t)
        if since is not None:
            q = q.where(tcol >= since)
        if until is not None:
            q = q.where(tcol < until)
        try:
            with self.engine.connect() as conn:
                frame = pd.read_sql(q, conn)
                if table != "readings":
                    return frame
                b = self.reading_blocks
                qb = sa.select(b.c.device_id, b.c.ts, b.c.state, b.c.seq, b.c.label, b.c.vals).order_by(b.c.id)
                if since is not None:
                    qb = qb.where(b.c.ts_last >= since)
                if until is not None:
                    qb = qb.where(b.c.ts_first < until)
                held = [r for row in conn.execute(qb) for r in _block_readings(*row)]
        except SQLAlchemyError as exc:
            msg = f"cannot read {table} from {_safe_url(self.url)}: {exc}"
            raise StoreError(msg) from exc
        if not held:
            return frame
        # readings held in blocks join the rows; the whole is then in time order
        cols = {"device_id": [r.device_id for r in held], "ts": [r.ts for r in held],
                "state": [r.state for r in held], "seq": [r.seq for r in held], "tag": [None] * len(held),
                "label": [r.label for r in held]}
        values = np.array([r.values for r in held], dtype=np.float64).reshape(len(held), -1)
        cols |= {name: values[:, i] for i, name in enumerate(self.schema.names)}
        more = pd.DataFrame(cols)
        if since is not None:
            more = more[more["ts"] >= since]
        if until is not None:
            more = more[more["ts"] < until]
        both = pd.concat([frame.drop(columns=["id"]), more], ignore_index=True) if len(frame) else more
        return both.sort_values("ts", kind="stable", ignore_index=True)

    def dispose(self) -> None:
        self.flush_devices()
        self.engine.dispose()


def reading_rows(readings: Iterable[Reading | Block]) -> list[tuple[Any, ...]]:
    """Rows for the readings table in `Store.reading_columns` order (NaN dropouts become NULL)."""
    if not isinstance(readings, list) or any(type(r) is Block for r in readings):
        out: list[tuple[Any, ...]] = []
        for r in readings:
            if isinstance(r, Block):
                out.extend(block_rows(r))
            else:
                out.extend(reading_rows([r]))
        return out
    return [
        (r.device_id, r.ts, r.state, r.seq, r.tag, r.label, *[None if v != v else v for v in r.values])  # type: ignore[union-attr]
        for r in readings
    ]


def block_record(block: Block) -> tuple[Any, ...]:
    """A `Block` as one ``reading_blocks`` row (`BLOCK_COLUMNS`): its columns as JSON arrays,
    floats written so that they read back exactly, a dropout as null."""
    n = len(block.ts)
    states = block.state_names()
    as_numpy = orjson.OPT_SERIALIZE_NUMPY
    return (
        block.device_id, float(block.ts[0]), float(block.ts[-1]), n,
        orjson.dumps(block.ts, option=as_numpy).decode(), orjson.dumps(states).decode(),
        None if block.seq is None else orjson.dumps(block.seq).decode(),
        None if block.labels is None else orjson.dumps(block.labels).decode(),
        orjson.dumps(block.values, option=as_numpy).decode(),
    )


def _block_readings(device_id: str, ts: str, state: str, seq: str | None, label: str | None, vals: str
                    ) -> list[Reading]:
    """The readings of one stored block (the columns of `block_record`)."""
    times = orjson.loads(ts)
    n = len(times)
    states = orjson.loads(state)
    seqs = orjson.loads(seq) if seq is not None else [None] * n
    labels = orjson.loads(label) if label is not None else [None] * n
    nan = float("nan")
    rows = [tuple(nan if v is None else float(v) for v in row) for row in orjson.loads(vals)]
    return [Reading(device_id, float(t), st, v, q, None, lb)
            for t, st, v, q, lb in zip(times, states, rows, seqs, labels, strict=True)]


def block_rows(block: Block) -> list[tuple[Any, ...]]:
    """`reading_rows` of a `Block`, built from its columns."""
    n = len(block.ts)
    values = block.values
    rows = values.tolist()
    if np.isnan(values).any():
        rows = [[None if v != v else v for v in row] for row in rows]
    states = block.state_names()
    seq = block.seq if block.seq is not None else [None] * n
    labels = block.labels if block.labels is not None else [None] * n
    dev = block.device_id
    return [(dev, t, st, q, None, lb, *v) for t, st, q, lb, v in zip(block.ts.tolist(), states, seq, labels, rows,
                                                                     strict=True)]


def anomaly_row(
    device_id: str,
    start: float,
    end: float,
    state: str,
    score: float,
    conf: float,
    exp: Any,
    tags: Sequence[str],
    label: str | None,
) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "window_start": start,
        "window_end": end,
        "state": state,
        "score": score,
        "confidence": conf,
        "dominant_family": exp.dominant_family,
        "families": json.dumps(exp.families),
        "top_features": json.dumps(exp.top_features),
        "tags": json.dumps(list(tags)) if tags else None,
        "label": label,
    }


def _with_installed_driver(url: str) -> Any:
    """``postgresql://`` means SQLAlchemy's default driver (psycopg 3 since 2.1); when only
    psycopg2 is installed, use that instead of failing on the import."""
    u = sa.engine.make_url(url)
    if u.drivername == "postgresql":
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return u.set(drivername="postgresql+psycopg2")
    return u


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _short(exc: Any, limit: int = 300) -> str:
    text = str(exc).strip().replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _sqlite_file(url: str) -> str | None:
    """The file of a ``sqlite:///PATH`` URL; None for other databases and in-memory SQLite.

    Examples
    --------
    >>> _sqlite_file("sqlite:///data/plant.db"), _sqlite_file("sqlite://"), _sqlite_file("postgresql://h/db")
    ('data/plant.db', None, None)
    """
    try:
        u = sa.engine.make_url(url)
    except Exception:  # noqa: BLE001 - an unusable URL is create_engine's to report
        return None
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return u.database


def _safe_url(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only used to print a URL without its password
        return "<database URL>"


class StoreWriter:
    """A thread that owns store writes, so they stay off the processing loop.

    ``submit`` blocks when ``max_pending`` batches or ``max_pending_rows`` rows are
    waiting: a slow database slows intake instead of growing memory.

    Failures:

    * the store failed (locked, disk full, connection lost): the batch is retried with
      backoff, never dropped; the owner sees it in `stalled_for` and decides how long
      that may last;
    * the store refused a row (a value out of a column's range or width, bad text): the
      batch is split in halves until the refused rows are found; the rest is stored,
      the refused ones go to ``on_rejected(part, rows, why)``, which returns dead-letter
      bodies to store instead (reason ``store_rejected``), and the batch counts as
      committed, so its messages are acknowledged and never come back;
    * the thread itself dies (a bug): `error` is set, `alive` turns False, and `submit`
      and `flush` raise or return instead of waiting for ever.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_pending: int = 64,
        max_pending_rows: int = 50_000,
        on_written: Any = None,
        on_rejected: Callable[[str, list[Any], str], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.store = store
        self._q: queue.Queue[StoreBatch | None] = queue.Queue(maxsize=max_pending)
        self._rows = 0
        self._max_rows = max_pending_rows
        self._room = threading.Condition()
        self._on_written = on_written
        self._on_rejected = on_rejected
        self.failures = 0  # failed write attempts (transient or refused)
        self.rejected_rows = 0  # rows the store refused (dead-lettered)
        self.error: BaseException | None = None  # why the thread died, if it did
        self._busy_since: float | None = None  # monotonic time the current batch was taken
        self._thread = threading.Thread(target=self._run, name="itap-store-writer", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def _check_alive(self) -> None:
        if not self.alive:
            msg = f"the store writer thread has stopped: {self.error!r}"
            raise StoreError(msg)

    def stalled_for(self, now: float | None = None) -> float:
        """Seconds the writer has been working on one batch without committing it (0 when idle)."""
        since = self._busy_since
        return 0.0 if since is None else max(0.0, (time.monotonic() if now is None else now) - since)

    def submit(self, batch: StoreBatch) -> None:
        """Queue a batch; blocks while too much is pending; `StoreError` if the writer died."""
        if not (len(batch) or batch.on_commit):
            return
        with self._room:
            # one batch larger than the bound still goes (alone): never deadlock
            while not self._room.wait_for(
                lambda: self._rows == 0 or self._rows + len(batch) <= self._max_rows, timeout=0.5
            ):
                self._check_alive()
            self._rows += len(batch)
        while True:
            self._check_alive()
            try:
                self._q.put(batch, timeout=0.5)
                return
            except queue.Full:
                continue

    @property
    def pending(self) -> int:
        return self._q.qsize()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - a writer that dies quietly stalls the whole service
            self.error = exc
            log.critical("the store writer thread died: %r", exc, exc_info=True)
            with self._room:
                self._room.notify_all()

    def _loop(self) -> None:
        while True:
            batch = self._q.get()
            if batch is None:
                try:
                    self.store.flush_devices()
                except StoreError as exc:
                    log.error("%s", exc)
                self._q.task_done()
                return
            self._busy_since = time.monotonic()
            self._commit(batch)
            for fn in batch.on_commit:
                fn()
            with self._room:
                self._rows -= len(batch)
                self._room.notify_all()
            self._busy_since = None
            self._q.task_done()

    def _commit(self, batch: StoreBatch) -> None:
        """Write ``batch``: retried while the store fails, split when it refuses a row."""
        delay = 0.05
        while True:
            try:
                t0 = time.perf_counter()
                try:
                    self.store.write(batch)
                except StoreWriteError as exc:
                    if exc.transient:
                        raise
                    self.failures += 1
                    log.error("%s; finding the refused rows, the rest is stored", exc)
                    self._isolate(batch)
                if self._on_written is not None:
                    self._on_written(batch, time.perf_counter() - t0)
                return
            except StoreWriteError as exc:
                self.failures += 1
                log.error("%s; retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _isolate(self, batch: StoreBatch) -> None:
        """Write each part of ``batch`` on its own, halving a refused part until the refused
        rows are found. A store failure (transient) on the way raises: the caller retries,
        and the parts already written are not written again."""
        for part in BATCH_PARTS:
            rows: Any = getattr(batch, part)
            if not rows:
                continue
            items = list(rows.items()) if part == "devices" else list(rows)
            refused = self._bisect(part, items)
            setattr(batch, part, {} if part == "devices" else [])  # done: not written again on a retry
            if not refused:
                continue
            self.rejected_rows += len(refused)
            why = refused[0][1]
            rows_out = [r for r, _why in refused]
            log.error("the store refused %d %s row(s): %s", len(rows_out), part, why)
            if part == "deadletters":
                # a dead letter the store refuses even after cleaning: keep a plain ASCII copy
                fallback = [{**deadletter_row(d), "detail": ascii(d.get("detail"))[:4096],
                             "payload": ascii(d.get("payload"))[:4096]} for d in rows_out]
                if self._bisect("deadletters", fallback):
                    log.error("%d dead letter(s) could not be stored at all (published only)", len(fallback))
            elif self._on_rejected is not None:
                letters = self._on_rejected(part, rows_out, why)
                if letters and self._bisect("deadletters", letters):
                    log.error("%d store_rejected dead letter(s) could not be stored (published only)", len(letters))

    def _bisect(self, part: str, items: list[Any]) -> list[tuple[Any, str]]:
        """Write ``items`` of one part; returns the refused ones with the store's reason."""
        if not items:
            return []
        only: dict[str, Any] = {part: dict(items) if part == "devices" else items}
        sub = StoreBatch(**only)
        try:
            self.store.write(sub)
            return []
        except StoreWriteError as exc:
            if exc.transient:
                raise
            if len(items) == 1:
                return [(items[0], str(exc))]
        mid = len(items) // 2
        return self._bisect(part, items[:mid]) + self._bisect(part, items[mid:])

    def flush(self, timeout_s: float | None = None) -> bool:
        """Block until every submitted batch is committed; False when ``timeout_s`` ran out
        or the writer died first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._q.all_tasks_done:
            while self._q.unfinished_tasks:
                if not self.alive:
                    return False
                left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if left <= 0:
                    return False
                self._q.all_tasks_done.wait(left)
        return True

    def close(self, timeout_s: float | None = None) -> bool:
        """Stop the thread after what is queued; False when it did not finish in ``timeout_s``."""
        if self.alive:
            try:
                self._q.put(None, timeout=timeout_s)
            except queue.Full:
                return False
            self._thread.join(timeout_s)
        return not self._thread.is_alive()
