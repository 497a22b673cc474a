"""Model: vectorised scores equal scikit-learn's; artifacts round-trip and are verified."""

from __future__ import annotations

import numpy as np
import pytest

from itap_stream.adapters import artifacts
from itap_stream.core.model import IsolationForestDetector
from itap_stream.core.pipeline import check_compatible
from itap_stream.core.schema import SensorSchema
from itap_stream.errors import ArtifactError, SchemaMismatch


def test_forest_scores_identical_to_scikit_learn():
    rng = np.random.default_rng(0)
    det = IsolationForestDetector(n_estimators=60, seed=4)
    det.fit(rng.normal(size=(2000, 12)))
    X = rng.normal(size=(700, 12)) * 2.0
    for n in (1, 7, 64, 700):
        np.testing.assert_array_equal(det.forest_score(X[:n]), det.score_sklearn(X[:n]))


def test_trained_model_separates_a_fault_from_normal(trained, schema):
    from itap_stream.app.offline import windows_of_frame
    from simulator import Fault, simulate

    sim = simulate(2, 1800, seed=77, faults=[Fault("power_instability", "DEV-0002", 600, 1200)], maint=False)
    bw = windows_of_frame(sim.to_frame(), schema, 32, 4)
    scores = trained.detector.score(bw.features)
    faulty = np.array([lbl == "power_instability" for lbl in bw.label])
    assert np.median(scores[faulty]) > trained.threshold > np.median(scores[~faulty])


def test_saved_and_reloaded_model_gives_identical_scores(trained, tmp_path):
    path = tmp_path / "m.joblib"
    manifest = artifacts.save(trained, path)
    assert manifest["feature_names"] == list(trained.feature_names)
    assert len(manifest["sha256"]) == 64
    back = artifacts.load(path)
    X = np.random.default_rng(1).normal(size=(50, len(trained.feature_names)))
    np.testing.assert_array_equal(back.detector.score(X), trained.detector.score(X))
    assert back.threshold == trained.threshold


def test_tampered_model_is_refused_before_unpickling(trained, tmp_path):
    path = tmp_path / "m.joblib"
    artifacts.save(trained, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="fails verification"):
        artifacts.load(path)


def test_model_without_manifest_is_refused(trained, tmp_path):
    path = tmp_path / "m.joblib"
    artifacts.save(trained, path)
    artifacts.manifest_path(path).unlink()
    with pytest.raises(ArtifactError, match="manifest"):
        artifacts.load(path)


def test_consumer_refuses_model_of_another_schema(trained, schema):
    other = SensorSchema.from_dict(
        {"signals": [*schema.to_dict()["signals"], {"name": "pressure_bar", "family": "Pressure"}]}
    )
    with pytest.raises(SchemaMismatch, match="pressure_bar"):
        check_compatible(trained, other, 32, 4)
    with pytest.raises(SchemaMismatch, match="window=16"):
        check_compatible(trained, schema, 16, 4)
