"""Features: oracle tests against plain numpy, determinism, causality, and batch == stream."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from itap_stream.core.batch import batch_windows
from itap_stream.core.features import SIGNAL_STATS, extract, feature_names
from itap_stream.core.pipeline import Processor
from itap_stream.core.readings import Reading
from itap_stream.core.rules import RuleEngine
from itap_stream.core.schema import STATES
from itap_stream.core.window import FleetWindows
from simulator import default_faults, simulate


def _oracle(window: np.ndarray, states: np.ndarray) -> dict[str, float]:
    """Each feature of one window, computed the plain way, one signal at a time."""
    out: dict[str, float] = {}
    w = len(window)
    for s in range(window.shape[1]):
        raw = window[:, s]
        present = raw[~np.isnan(raw)]
        fill = present.mean() if len(present) else 0.0
        x = np.where(np.isnan(raw), fill, raw)
        t = np.arange(w)
        spec = np.abs(np.fft.rfft(x - x.mean()))[1:]
        energy = float(np.sum(spec**2) / w)
        std = float(np.std(x))
        vals = {
            "mean": float(np.mean(x)),
            "std": std,
            "min": float(np.min(x)),
            "max": float(np.max(x)),
            "slope": float(np.polyfit(t, x, 1)[0]),
            "delta": float(x[-1] - np.mean(x)),
            "zlast": float((x[-1] - np.mean(x)) / std) if std > 1e-12 else 0.0,
            "fft_energy": energy,
            "fft_freq": float((np.argmax(spec) + 1) / w) if energy > 1e-12 else 0.0,
            "missing": float(np.isnan(raw).sum()),
        }
        for k, v in vals.items():
            out[f"s{s}_{k}"] = v
    any_missing = np.isnan(window).any(axis=1)
    streak = 0
    for m in any_missing[::-1]:
        if not m:
            break
        streak += 1
    out["missing_streak"] = float(streak)
    out["state_transitions"] = float(sum(1 for a, b in zip(states[:-1], states[1:], strict=True) if a != b))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_feature_equals_plain_numpy(seed):
    rng = np.random.default_rng(seed)
    w, s = 32, 3
    values = rng.normal(size=(4, w, s)) * [1.0, 10.0, 0.1] + [0.0, 100.0, 5.0]
    values[1, 5, 0] = np.nan  # a dropout inside
    values[2, -3:, 1] = np.nan  # a trailing dropout streak
    values[3, :, 2] = 7.0  # a flat signal (std 0)
    states = rng.integers(0, 3, size=(4, w)).astype(np.int8)
    got = extract(values, states)
    assert got.shape == (4, s * len(SIGNAL_STATS) + 2)
    for i in range(4):
        want = _oracle(values[i], states[i])
        np.testing.assert_allclose(got[i], list(want.values()), rtol=1e-9, atol=1e-9, err_msg=f"window {i}")


def test_extract_does_not_mutate_its_input():
    values = np.random.default_rng(3).normal(size=(2, 8, 2))
    values[0, 3, 1] = np.nan
    before = values.copy()
    extract(values, np.zeros((2, 8), dtype=np.int8))
    np.testing.assert_array_equal(values, before)


def test_same_seed_same_features(schema):
    def feats(seed):
        f = simulate(3, 600, seed=seed).to_frame()
        codes = f["state"].map({s: i for i, s in enumerate(STATES)}).to_numpy()
        return batch_windows(
            f["device_id"], f["ts"], codes, f[list(schema.names)].to_numpy(), window=32, hop=4
        ).features

    np.testing.assert_array_equal(feats(5), feats(5))
    assert not np.array_equal(feats(5), feats(6))


def _readings(frame, schema):
    names = list(schema.names)
    out = []
    for row in frame.itertuples(index=False):
        d = row._asdict()
        vals = tuple(float("nan") if d[n] != d[n] else float(d[n]) for n in names)
        label = d["label"] if isinstance(d["label"], str) else None
        out.append(Reading(d["device_id"], float(d["ts"]), d["state"], vals, int(d["seq"]), None, label))
    return out


def test_batch_features_equal_stream_features(schema, trained):
    """No train/serve skew: the CSV path and the reading-by-reading consumer path agree."""
    sim = simulate(4, 900, seed=11, faults=default_faults(4, 900))
    frame = sim.to_frame()
    # disorder the stream a little: a duplicate and a late reading must be dropped by both paths
    frame = frame.copy()
    dup = frame.iloc[[100]]
    late = frame.iloc[[40]].assign(ts=frame.iloc[40]["ts"] - 0.5)
    frame = pd.concat([frame.iloc[:200], dup, late, frame.iloc[200:]], ignore_index=True)
    readings = _readings(frame, schema)

    proc = Processor(schema, trained, RuleEngine([]), window=32, hop=4)
    stream_rows, stream_dev, stream_end = [], [], []
    for i in range(0, len(readings), 37):  # uneven micro-batches
        res = proc.process(readings[i : i + 37])
        if res.features is not None:
            stream_rows.append(res.features)
            stream_dev += res.windows.device_ids
            stream_end += res.windows.end_ts.tolist()
    stream = np.concatenate(stream_rows)

    codes = frame["state"].map({s: i for i, s in enumerate(STATES)}).to_numpy()
    bw = batch_windows(frame["device_id"], frame["ts"], codes, frame[list(schema.names)].to_numpy(), window=32, hop=4)
    order_s = np.lexsort((np.array(stream_end), np.array(stream_dev)))
    order_b = np.lexsort((bw.end_ts, bw.device_ids.astype(str)))
    assert len(stream) == len(bw) > 0
    np.testing.assert_array_equal(np.array(stream_dev)[order_s], bw.device_ids[order_b])
    np.testing.assert_array_equal(stream[order_s], bw.features[order_b])
    assert (~bw.accepted).sum() == 2  # the re-sent and the late reading, both arriving after newer ones


def test_no_window_uses_a_later_reading(schema):
    """Changing readings after a window's end never changes that window's features."""
    frame = simulate(2, 400, seed=3).to_frame()
    codes = frame["state"].map({s: i for i, s in enumerate(STATES)}).to_numpy()
    vals = frame[list(schema.names)].to_numpy()
    base = batch_windows(frame["device_id"], frame["ts"], codes, vals, window=32, hop=4)
    cut = len(frame) // 2
    vals2 = vals.copy()
    vals2[cut:] *= 3.0
    changed = batch_windows(frame["device_id"], frame["ts"], codes, vals2, window=32, hop=4)
    early = base.end_row < cut
    assert early.sum() > 0
    np.testing.assert_array_equal(base.features[early], changed.features[early])
    assert not np.array_equal(base.features[~early], changed.features[~early])


def test_ring_buffer_drops_duplicates_and_late_readings():
    fw = FleetWindows(n_signals=1, window=4, hop=2)
    assert [fw.push(Reading("A", t, "RUN", (float(t),))) for t in (1, 2, 2, 1.5, 3)] == [0, 0, -1, -2, 0]
    assert fw.last_ts("A") == 3


def test_feature_names_carry_signal_and_stat(schema):
    names = feature_names(schema)
    assert "voltage_v_std" in names and "current_a_max" in names
    assert len(names) == len(set(names))
