"""CSV files of readings: one row per reading, a column per signal.

Required columns: ``ts`` (epoch seconds or RFC 3339) and every signal of the schema.
Optional: ``device_id`` (absent: the whole file is one device, named after the file),
``state`` (default RUN), ``seq``, ``tag``, ``label``. Empty cells are dropouts. A schema
may map other column names (``timestamp_column``, ``device_column``, a signal's
``column``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from itap_stream.config import not_utf8_message
from itap_stream.core.schema import STATES, SensorSchema
from itap_stream.errors import DataError

__all__ = ["TIMESTAMP_NAMES", "map_columns", "open_csv", "read_readings", "sniff_delimiter", "write_readings"]

#: Column names taken as the timestamp when the schema does not name one and there is no ``ts``.
TIMESTAMP_NAMES = frozenset({"timestamp", "datetime", "time", "date_time", "date"})


def open_csv(path: str | Path, **read_csv: object) -> Any:
    """`pandas.read_csv` of a readings file with its own separator (`sniff_delimiter`); a
    missing, non-UTF-8 or unparsable file is one `DataError`. Every command reads CSVs here
    (``chunksize`` gives an iterator of frames)."""
    p = Path(path)
    if not p.is_file():
        msg = f"CSV file not found: {p}"
        raise DataError(msg)
    try:
        return pd.read_csv(p, sep=sniff_delimiter(p), **read_csv)  # type: ignore[call-overload]
    except UnicodeDecodeError:
        raise DataError(not_utf8_message("CSV", p)) from None
    except (ValueError, pd.errors.ParserError) as exc:
        msg = f"cannot parse CSV {p}: {exc}"
        raise DataError(msg) from exc


def map_columns(df: pd.DataFrame, schema: SensorSchema, path: str | Path) -> pd.DataFrame:
    """A raw CSV frame (or chunk) under the names the core uses, as the schema says: its
    column mapping (a signal's ``column``, ``timestamp_column``, ``device_column``), a
    timestamp column found by name (`TIMESTAMP_NAMES`) when the schema names none, its
    ``label_column`` as ``label``, and for a file with no device column (a recording of one
    machine) the file's name as ``device_id``. `read_readings`, ``itap validate`` and
    ``itap ingest`` all go through here, so they agree on what a file holds."""
    renames = schema.csv_renames()
    if renames:
        df = df.rename(columns=renames)
    if "ts" not in df.columns and schema.timestamp_column == "ts":
        # a recording that names its clock column otherwise and a schema that does not say
        guess = [c for c in df.columns if str(c).strip().lower() in TIMESTAMP_NAMES]
        if len(guess) == 1:
            df = df.rename(columns={guess[0]: "ts"})
    if schema.label_column and schema.label_column in df.columns and "label" not in df.columns:
        df["label"] = _labels_of(df.pop(schema.label_column))
    if "device_id" not in df.columns and "ts" in df.columns:
        # a recording of one machine: a timestamp column and one column per signal
        df["device_id"] = Path(path).stem
    return df


def read_readings(path: str | Path, schema: SensorSchema) -> pd.DataFrame:
    """Read and type-check a readings CSV; raises `DataError` naming what is wrong."""
    p = Path(path)
    df = open_csv(p, dtype={"device_id": str, "state": str, "tag": str, "label": str}, low_memory=False)
    df = map_columns(df, schema, p)
    if df.empty:
        msg = f"CSV {p} holds no readings (a header only)"
        raise DataError(msg)
    required = ["device_id", "ts", *schema.names]
    missing = [c for c in required if c not in df.columns]
    if missing:
        msg = f"CSV {p} lacks required column(s) {missing}; it has {list(df.columns)}"
        raise DataError(msg)
    if not pd.api.types.is_string_dtype(df["device_id"]) and not df["device_id"].isna().any():
        df["device_id"] = df["device_id"].astype(str)
    if df["device_id"].isna().any():
        msg = f"CSV {p}: {int(df['device_id'].isna().sum())} row(s) have no device_id"
        raise DataError(msg)
    ts = df["ts"]
    if not pd.api.types.is_numeric_dtype(ts):
        parsed = pd.to_datetime(ts, utc=True, errors="coerce", format="mixed")
        bad = parsed.isna()
        if bad.any():
            msg = (
                f"CSV {p}: column ts has {int(bad.sum())} value(s) that are neither epoch seconds nor RFC 3339, "
                f"first {ts[bad].iloc[0]!r}"
            )
            raise DataError(msg)
        df["ts"] = (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    df["ts"] = df["ts"].astype(np.float64)
    if "state" not in df.columns:
        df["state"] = "RUN"
    df["state"] = df["state"].fillna("RUN")
    bad_state = ~df["state"].isin(STATES)
    if bad_state.any():
        msg = (
            f"CSV {p}: unknown state(s) {sorted(df.loc[bad_state, 'state'].unique().tolist())[:5]}; "
            f"expected {list(STATES)}"
        )
        raise DataError(msg)
    for name in schema.names:
        if not pd.api.types.is_numeric_dtype(df[name]):
            coerced = pd.to_numeric(df[name], errors="coerce")
            bad = coerced.isna() & df[name].notna()
            if bad.any():
                msg = f"CSV {p}: column {name} has non-numeric value(s), first {df.loc[bad, name].iloc[0]!r}"
                raise DataError(msg)
            df[name] = coerced
        df[name] = df[name].astype(np.float64)
    for col in ("tag", "label"):
        if col not in df.columns:
            df[col] = None
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    df["label"] = _labels_of(df["label"])
    if "seq" not in df.columns:
        df["seq"] = None
    return df


def sniff_delimiter(path: str | Path) -> str:
    """The field separator of a CSV file: the one of ``,`` ``;`` ``\\t`` that its header line
    uses most (recordings exported with a decimal comma use ``;``).

    Examples
    --------
    >>> import tempfile, os
    >>> with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as fh:
    ...     _ = fh.write("datetime;Current;Voltage\\n2020-01-01 00:00:00;1.5;230\\n")
    >>> sniff_delimiter(fh.name)
    ';'
    >>> os.unlink(fh.name)
    """
    with open(path, encoding="utf-8", errors="replace") as fh:
        header = fh.readline()
    counts = {sep: header.count(sep) for sep in (",", ";", "\t")}
    best = max(counts, key=lambda k: counts[k])
    return best if counts[best] else ","


def _labels_of(col: pd.Series) -> pd.Series:
    """Ground truth from a label column: 0/1 (or true/false) become ``anomaly``/None, text is kept."""
    if pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
        num = pd.to_numeric(col, errors="coerce").fillna(0)
        # numpy's stubs take no None for x/y, though an object array holds it fine
        labels = np.where(num != 0, "anomaly", None)  # type: ignore[call-overload]
        return pd.Series(labels, index=col.index, dtype=object)
    if col.dropna().map(lambda v: str(v).strip().lower() in {"0", "1", "0.0", "1.0", "true", "false"}).all():
        # the same 0/1 column read as text (validate and ingest read every cell as text)
        return _labels_of(col.map(lambda v: None if v is None or v != v else
                                  float(str(v).strip().lower() in {"1", "1.0", "true"})).astype(float))
    text = col.astype(object).where(col.notna(), None)
    falsy = text.map(lambda v: v is None or str(v).strip().lower() in {"", "0", "false", "normal", "none"})
    return text.where(~falsy, None)


def write_readings(df: pd.DataFrame, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(p, index=False)
