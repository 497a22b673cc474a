"""A model is loaded only from where the operator put it, and unpickled only when signed with the operator's key.

The attack (issue 14): an MQTT ``reload`` command names ``/any/path/e.joblib``; the attacker wrote a
malicious pickle there plus ``e.joblib.json`` with its sha256. The checksum beside the file proves nothing.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import joblib
import pytest

from itap_stream.adapters import artifacts
from itap_stream.adapters.csvio import write_readings
from itap_stream.app.service import train
from itap_stream.config import PACKAGE_CONFIGS, load
from itap_stream.errors import ArtifactError

KEY = b"operator-secret-key-0123456789"
OTHER_KEY = b"attacker-guessed-key-987654321"


class _Evil:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant_attack(where: Path, marker: Path) -> Path:
    """Exactly the attack: a malicious ``e.joblib`` plus an ``e.joblib.json`` manifest holding its sha256."""
    where.mkdir(parents=True, exist_ok=True)
    evil = where / "e.joblib"
    joblib.dump(_Evil(marker), evil)
    manifest = {"format_version": 1, "sha256": hashlib.sha256(evil.read_bytes()).hexdigest(), "threshold": 1.0}
    artifacts.manifest_path(evil).write_text(json.dumps(manifest), encoding="utf-8")
    return evil


def _reload(path: str, models_dir: Path, key: bytes | None):
    """What the consumer does with a ``reload`` command's model_path."""
    return artifacts.load(artifacts.resolve_model_path(path, models_dir), key=key)


# (a) the attack: no code runs ------------------------------------------------------------------------------


def test_the_attack_is_real_without_any_check(tmp_path):
    """Control: the planted file does run code when unpickled with only the checksum check."""
    marker = tmp_path / "pwned"
    evil = _plant_attack(tmp_path / "models", marker)
    with pytest.raises(ArtifactError, match="does not contain an ITAP model artifact"):
        artifacts.load(evil)
    assert marker.exists()


def test_unsigned_manifest_is_refused_before_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    evil = _plant_attack(tmp_path / "models", marker)  # even inside the models directory
    with pytest.raises(ArtifactError, match="not signed with the configured key; refusing to load it"):
        artifacts.load(evil, key=KEY)
    with pytest.raises(ArtifactError, match="not signed with the configured key"):
        _reload(str(evil), tmp_path / "models", KEY)
    assert not marker.exists()


def test_attack_signed_with_another_key_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _plant_attack(tmp_path / "models", marker)
    mp = artifacts.manifest_path(evil)
    manifest = json.loads(mp.read_text(encoding="utf-8"))
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    import hmac

    manifest["signature"] = {"alg": "hmac-sha256", "value": hmac.new(OTHER_KEY, body, hashlib.sha256).hexdigest()}
    mp.write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ArtifactError, match="signature mismatch"):
        artifacts.load(evil, key=KEY)
    assert not marker.exists()


def test_attack_outside_models_dir_is_refused_even_without_a_key(tmp_path):
    marker = tmp_path / "pwned"
    models = tmp_path / "models"
    models.mkdir()
    evil = _plant_attack(tmp_path / "elsewhere", marker)
    with pytest.raises(ArtifactError, match="outside the models directory"):
        _reload(str(evil), models, None)
    assert not marker.exists()


# (b) the directory rule ------------------------------------------------------------------------------------


def test_resolve_model_path_accepts_a_file_inside(tmp_path):
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    assert artifacts.resolve_model_path(models / "m.joblib", models) == (models / "m.joblib").resolve()
    assert artifacts.resolve_model_path(str(models / "sub" / "m.joblib"), str(models)) == (
        models / "sub" / "m.joblib"
    ).resolve()


def test_resolve_model_path_relative_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    assert artifacts.resolve_model_path("models/m.joblib", "models") == (tmp_path / "models" / "m.joblib").resolve()
    with pytest.raises(ArtifactError, match="outside the models directory"):
        artifacts.resolve_model_path("m.joblib", "models")


@pytest.mark.parametrize("bad", ["elsewhere/e.joblib", "models/../x.joblib", "models/sub/../../x.joblib", "models"])
def test_resolve_model_path_refuses_outside(tmp_path, bad):
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    with pytest.raises(ArtifactError, match="outside the models directory") as info:
        artifacts.resolve_model_path(tmp_path / bad, models)
    assert str(models) in str(info.value)


def test_resolve_model_path_refuses_an_absolute_path_elsewhere(tmp_path):
    (tmp_path / "models").mkdir()
    with pytest.raises(ArtifactError, match="outside the models directory"):
        artifacts.resolve_model_path("/tmp/elsewhere/e.joblib", tmp_path / "models")


def test_resolve_model_path_refuses_a_symlink_out(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    evil = _plant_attack(tmp_path / "elsewhere", tmp_path / "pwned")
    (models / "e.joblib").symlink_to(evil)
    (models / "out").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    for path in (models / "e.joblib", models / "out" / "e.joblib"):
        with pytest.raises(ArtifactError, match="outside the models directory"):
            artifacts.resolve_model_path(path, models)
    assert not (tmp_path / "pwned").exists()


def test_resolve_model_path_refuses_an_empty_models_dir(tmp_path):
    with pytest.raises(ArtifactError, match="no models directory"):
        artifacts.resolve_model_path(tmp_path / "m.joblib", "")


# (c) signatures --------------------------------------------------------------------------------------------


@pytest.fixture()
def signed(trained, tmp_path) -> Path:
    path = tmp_path / "models" / "m.joblib"
    manifest = artifacts.save(trained, path, key=KEY)
    assert manifest["signature"]["alg"] == "hmac-sha256"
    return path


def test_signed_model_loads_with_its_key(signed, trained):
    art = artifacts.load(signed, key=KEY)
    assert art.threshold == trained.threshold
    assert artifacts.load(signed).threshold == trained.threshold  # no key configured: checksum only, as before


def test_signed_model_is_refused_with_another_key(signed):
    with pytest.raises(ArtifactError, match="signature mismatch"):
        artifacts.load(signed, key=OTHER_KEY)


def test_unsigned_model_is_refused_when_a_key_is_configured(trained, tmp_path):
    path = tmp_path / "m.joblib"
    artifacts.save(trained, path)
    with pytest.raises(ArtifactError, match="not signed with the configured key"):
        artifacts.load(path, key=KEY)


def test_edited_manifest_is_refused(signed):
    mp = artifacts.manifest_path(signed)
    manifest = json.loads(mp.read_text(encoding="utf-8"))
    manifest["threshold"] = manifest["threshold"] * 10
    mp.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    with pytest.raises(ArtifactError, match="signature mismatch"):
        artifacts.load(signed, key=KEY)


def test_replaced_joblib_is_refused(signed, tmp_path):
    marker = tmp_path / "pwned"
    joblib.dump(_Evil(marker), signed)
    with pytest.raises(ArtifactError, match="fails verification"):
        artifacts.load(signed, key=KEY)
    assert not marker.exists()


def test_replaced_joblib_with_its_sha256_in_the_signed_manifest_is_refused(signed, tmp_path):
    marker = tmp_path / "pwned"
    joblib.dump(_Evil(marker), signed)
    mp = artifacts.manifest_path(signed)
    manifest = json.loads(mp.read_text(encoding="utf-8"))
    manifest["sha256"] = artifacts.sha256_file(signed)
    mp.write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ArtifactError, match="signature mismatch"):
        artifacts.load(signed, key=KEY)
    assert not marker.exists()


def test_itap_train_signs_with_the_configured_key(normal_frame, tmp_path, monkeypatch):
    monkeypatch.delenv("ITAP_MODEL_KEY", raising=False)
    csv = tmp_path / "normal.csv"
    write_readings(normal_frame, csv)
    key_file = tmp_path / "model.key"
    key_file.write_bytes(KEY + b"\n")
    settings = load(
        PACKAGE_CONFIGS / "itap.yaml", environ={}, model_path=str(tmp_path / "models" / "current.joblib"),
        model_key_file=str(key_file), window=32, hop=4,
    )
    _report, manifest = train(settings, csv=str(csv))
    assert manifest["signature"]["alg"] == "hmac-sha256"
    assert artifacts.load(settings.model_path, key=KEY).window == 32
    with pytest.raises(ArtifactError, match="signature mismatch"):
        artifacts.load(settings.model_path, key=OTHER_KEY)


# (d) the key -----------------------------------------------------------------------------------------------


def test_model_key_from_environment_wins(tmp_path):
    key_file = tmp_path / "k"
    key_file.write_bytes(OTHER_KEY)
    assert artifacts.model_key(str(key_file), environ={"ITAP_MODEL_KEY": KEY.decode()}) == KEY


def test_model_key_from_file_is_stripped(tmp_path):
    key_file = tmp_path / "k"
    key_file.write_bytes(b"  " + KEY + b"\n")
    assert artifacts.model_key(str(key_file), environ={}) == KEY
    assert artifacts.model_key(str(key_file), environ={"ITAP_MODEL_KEY": ""}) == KEY  # empty = unset


def test_no_key_configured_is_none():
    assert artifacts.model_key("", environ={}) is None


def test_model_key_file_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n \n")
    with pytest.raises(ArtifactError, match="is empty"):
        artifacts.model_key(str(empty), environ={})
    with pytest.raises(ArtifactError, match="cannot be read"):
        artifacts.model_key(str(tmp_path / "missing"), environ={})
    short = tmp_path / "short"
    short.write_bytes(b"tiny")
    with pytest.raises(ArtifactError, match="too short"):
        artifacts.model_key(str(short), environ={})
    with pytest.raises(ArtifactError, match="too short"):
        artifacts.model_key("", environ={"ITAP_MODEL_KEY": "short"})


# manifests that are not manifests ---------------------------------------------------------------------------


def test_non_utf8_manifest_is_an_artifact_error(tmp_path):
    path = tmp_path / "m.joblib"
    path.write_bytes(pickle.dumps(0))
    artifacts.manifest_path(path).write_bytes(b'{"sha256": "\xff\xfe"}')
    with pytest.raises(ArtifactError, match="not UTF-8"):
        artifacts.read_manifest(path)


def test_huge_manifest_is_refused_unread(tmp_path):
    path = tmp_path / "m.joblib"
    path.write_bytes(pickle.dumps(0))
    with open(artifacts.manifest_path(path), "wb") as fh:
        fh.truncate(artifacts.MAX_MANIFEST_BYTES + 1)
    with pytest.raises(ArtifactError, match="larger than 16 MiB"):
        artifacts.read_manifest(path)
