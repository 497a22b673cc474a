"""`itap ingest`: load a readings CSV into the store, chunk by chunk.

Idempotent: rows go in with insert-or-ignore on (device_id, ts), so a second run
inserts nothing and says how many rows were already stored. A bad row (no device, an
unreadable time, an unknown state, a value that is not a number, not finite or out of
the schema's range) does not fail the file: it goes to a report CSV with the reason,
named as the consumer names it on the dead-letter topic.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from itap_stream.adapters.csvio import map_columns, open_csv
from itap_stream.adapters.store import Store, StoreBatch
from itap_stream.app.validate import parse_ts_column
from itap_stream.config import not_utf8_message
from itap_stream.core.schema import STATES, SensorSchema
from itap_stream.errors import DataError

__all__ = ["IngestReport", "check_rows", "ingest_csv", "print_progress"]


@dataclass
class IngestReport:
    rows: int = 0
    inserted: int = 0
    already_stored: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    report_path: str | None = None


def check_rows(chunk: pd.DataFrame, schema: SensorSchema) -> tuple[pd.DataFrame, pd.Series]:
    """Typed good rows, and the reason for every bad row (index of ``chunk``), first problem wins."""
    reason = pd.Series(None, index=chunk.index, dtype=object)

    def flag(mask: pd.Series, why: str) -> None:
        reason[mask & reason.isna()] = why

    dev = chunk["device_id"]
    flag(dev.isna() | (dev.str.len() == 0), "missing_device_id")
    flag(chunk["ts"].isna(), "missing_ts")
    ts = parse_ts_column(chunk["ts"])
    flag(ts.isna() | ~np.isfinite(ts), "bad_ts")
    state = chunk["state"].fillna("RUN") if "state" in chunk.columns else pd.Series("RUN", index=chunk.index)
    flag(~state.isin(STATES), "unknown_state")
    values = {}
    for sig in schema.signals:
        raw = chunk[sig.name]
        num = pd.to_numeric(raw, errors="coerce")
        flag(num.isna() & raw.notna(), "wrong_type")
        flag(num.notna() & ~np.isfinite(num), "non_finite")
        flag((num < sig.min) | (num > sig.max), "out_of_range")
        values[sig.name] = num
    good = reason.isna()
    out = pd.DataFrame({"device_id": dev[good], "ts": ts[good], "state": state[good]})
    for col in ("seq", "tag", "label"):
        out[col] = chunk[col][good] if col in chunk.columns else None
    out["seq"] = pd.to_numeric(out["seq"], errors="coerce").astype("Int64") if len(out) else out["seq"]
    for name, num in values.items():
        out[name] = num[good]
    return out, reason[~good]


def _count_rows(path: Path) -> int:
    with path.open("rb") as fh:
        lines = sum(buf.count(b"\n") for buf in iter(lambda: fh.read(1 << 20), b""))
    return max(0, lines - 1)


def _plain(v: Any) -> Any:
    """A cell as the database driver takes it: Python scalars, None for NaN/NA (psycopg2
    cannot adapt numpy integers).

    Examples
    --------
    >>> import numpy as np
    >>> [_plain(x) for x in (np.int64(3), float("nan"), pd.NA, "RUN", 1.5)]
    [3, None, None, 'RUN', 1.5]
    """
    if v is None or v is pd.NA:
        return None
    if isinstance(v, np.generic):
        v = v.item()
    return None if isinstance(v, float) and v != v else v


def ingest_csv(
    path: str | Path,
    store: Store,
    *,
    report_path: str | Path | None = None,
    chunk_rows: int = 50_000,
    progress: Callable[[int, int], None] | None = None,
) -> IngestReport:
    """Load ``path`` into ``store``; bad rows to ``report_path`` (default ``<file>.rejected.csv``)."""
    p = Path(path)
    schema = store.schema
    reader = open_csv(p, dtype=str, chunksize=chunk_rows, keep_default_na=True)  # DataError when unreadable
    total = _count_rows(p)
    rep = IngestReport()
    bad_path = Path(report_path) if report_path else p.with_suffix(".rejected.csv")
    bad_written = False
    try:
        for raw in reader:
            chunk = map_columns(raw, schema, p)  # the schema's column mapping, as train and score read the file
            missing = [c for c in ("device_id", "ts", *schema.names) if c not in chunk.columns]
            if missing:
                msg = f"CSV {p} lacks required column(s) {missing}; it has {list(chunk.columns)}"
                raise DataError(msg)
            good, bad = check_rows(chunk, schema)
            rep.rows += len(chunk)
            if len(bad):
                rejected = chunk.loc[bad.index].assign(reason=bad)
                rejected.to_csv(bad_path, mode="a" if bad_written else "w", header=not bad_written, index=False)
                bad_written = True
                rep.rejected += len(bad)
                for why, n in bad.value_counts().items():
                    rep.reasons[str(why)] = rep.reasons.get(str(why), 0) + int(n)
            rows = [
                tuple(map(_plain, row))
                for row in good[list(store.reading_columns)].itertuples(index=False, name=None)
            ]
            spans = good.groupby("device_id")["ts"].agg(["min", "max"])
            devices = {str(d): (float(lo), float(hi)) for d, lo, hi in spans.itertuples(name=None)}
            inserted = 0
            for i in range(0, len(rows), 5000):
                inserted += store.write(StoreBatch(readings=rows[i : i + 5000], devices=devices if i == 0 else {}))
            rep.inserted += inserted
            rep.already_stored += len(rows) - inserted
            if progress is not None:
                progress(rep.rows, total)
    except UnicodeDecodeError:
        loaded = f" ({rep.rows:,} rows before it were loaded; a rerun skips them)" if rep.rows else ""
        raise DataError(not_utf8_message("CSV", p) + loaded) from None
    except (ValueError, pd.errors.ParserError) as exc:
        msg = f"cannot parse CSV {p} after {rep.rows:,} rows: {exc}"
        raise DataError(msg) from exc
    if not rep.rows:
        msg = f"CSV {p} holds no readings (a header only)"
        raise DataError(msg)
    rep.report_path = str(bad_path) if bad_written else None
    return rep


def print_progress(done: int, total: int, *, out: Any = None) -> None:
    """One progress line: rewritten in place on a terminal, a line of its own in a log."""
    out = out or sys.stderr
    pct = 100.0 * done / total if total else 100.0
    text = f"ingested {done:,} / {total:,} rows ({pct:5.1f}%)"
    tty = bool(getattr(out, "isatty", lambda: False)())
    out.write(f"\r{text}" + ("\n" if done >= total else "") if tty else f"{text}\n")
    out.flush()
