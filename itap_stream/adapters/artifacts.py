"""Model artifact files: ``<name>.joblib`` plus a ``<name>.joblib.json`` manifest.

The manifest (plain JSON, safe to read) records the sha256 of the joblib file and the
metadata an operator wants without unpickling: schema, features, threshold, training
summary, library versions. `load` verifies the checksum *before* unpickling, so a
damaged file is refused instead of executed.

A checksum beside the file proves nothing about who wrote it: whoever can write
``e.joblib`` can write ``e.joblib.json`` too. So, when the operator holds a key
(``ITAP_MODEL_KEY`` or ``model_key_file``, see `model_key`), `save` signs the manifest
with HMAC-SHA256 and `load` refuses, before reading or unpickling the model, any
manifest whose signature does not check out against that key. The manifest carries the
sha256 of the joblib file, so the signature covers the model bytes too. Independently,
`resolve_model_path` keeps a path from outside the configured models directory (``..``
or a symlink out of it) from being loaded at all.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import joblib

from itap_stream.core.model import Artifact
from itap_stream.errors import ArtifactError

__all__ = [
    "library_versions",
    "load",
    "manifest_path",
    "model_key",
    "read_manifest",
    "resolve_model_path",
    "save",
    "sha256_file",
]

MODEL_KEY_ENV = "ITAP_MODEL_KEY"
MIN_KEY_BYTES = 16
MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is a few KiB; refuse to parse anything near this
SIGNATURE_ALG = "hmac-sha256"


def manifest_path(path: str | Path) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".json")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_key(key_file: str = "", environ: Mapping[str, str] | None = None) -> bytes | None:
    """The operator's model-signing key, or None when none is configured.

    Parameters
    ----------
    key_file
        A file holding the key (the ``model_key_file`` setting); its bytes, stripped of
        surrounding whitespace, are the key.
    environ
        Where to look for ``ITAP_MODEL_KEY`` (text, used as UTF-8 bytes, stripped); it wins
        over ``key_file``. An empty value counts as unset, like every ``ITAP_*`` variable.
        Default: ``os.environ``.

    Returns
    -------
    The key, or None when neither is set. A key file that cannot be read or is empty, or a
    key shorter than 16 bytes, raises `ArtifactError`.

    Examples
    --------
    >>> model_key(environ={"ITAP_MODEL_KEY": "correct horse battery staple"})
    b'correct horse battery staple'
    >>> model_key(environ={}) is None
    True
    """
    env = os.environ if environ is None else environ
    text = env.get(MODEL_KEY_ENV, "")
    if text:
        key, source = text.strip().encode("utf-8"), MODEL_KEY_ENV
    elif key_file:
        try:
            key = Path(key_file).read_bytes().strip()
        except OSError as exc:
            msg = f"model key file {key_file} cannot be read: {exc}"
            raise ArtifactError(msg) from exc
        if not key:
            msg = f"model key file {key_file} is empty; put a random key of at least {MIN_KEY_BYTES} bytes in it"
            raise ArtifactError(msg)
        source = f"model key file {key_file}"
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        msg = f"the model key from {source} is too short: {len(key)} bytes, expected at least {MIN_KEY_BYTES}"
        raise ArtifactError(msg)
    return key


def resolve_model_path(path: str | Path, models_dir: str | Path) -> Path:
    """The real path of ``path``, provided it lies inside the real path of ``models_dir``.

    Both are resolved (symlinks followed, ``..`` collapsed) before the comparison, so
    ``models/../x.joblib`` and a symlink inside ``models_dir`` that points elsewhere are
    refused. A relative ``path`` is relative to the working directory, like the
    ``model_path`` setting (not to ``models_dir``). The returned path is the resolved one:
    load that, so the manifest is read beside the real file.
    """
    if not str(models_dir):
        msg = f"no models directory is configured; refusing to load a model from {path}"
        raise ArtifactError(msg)
    if not str(path):
        msg = "an empty model path was given; expected a .joblib file inside the models directory"
        raise ArtifactError(msg)
    root = Path(models_dir).resolve(strict=False)
    real = Path(path).resolve(strict=False)
    if real == root or not real.is_relative_to(root):
        msg = (
            f"model path {path} (really {real}) is outside the models directory {models_dir} "
            f"(really {root}); refusing to load it"
        )
        raise ArtifactError(msg)
    return real


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _sign(manifest: Mapping[str, Any], key: bytes) -> str:
    return hmac.new(key, _canonical(manifest), hashlib.sha256).hexdigest()


def _verify_signature(manifest: Mapping[str, Any], key: bytes, where: Path) -> None:
    sig = manifest.get("signature")
    value = sig.get("value") if isinstance(sig, dict) else None
    if not (isinstance(sig, dict) and sig.get("alg") == SIGNATURE_ALG and isinstance(value, str)):
        msg = (
            f"model manifest {where} is not signed with the configured key; refusing to load it "
            f"(it has no {SIGNATURE_ALG} signature: train with the key configured, `itap train`, to sign it)"
        )
        raise ArtifactError(msg)
    if not hmac.compare_digest(value.encode("ascii", "replace"), _sign(manifest, key).encode("ascii")):
        msg = (
            f"model manifest {where} is not signed with the configured key; refusing to load it "
            "(signature mismatch: the manifest was altered or signed with another key)"
        )
        raise ArtifactError(msg)


def library_versions() -> dict[str, str]:
    import numpy
    import sklearn

    import itap_stream

    return {
        "itap_stream": itap_stream.__version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "joblib": joblib.__version__,
    }


def save(artifact: Artifact, path: str | Path, *, key: bytes | None = None) -> dict[str, Any]:
    """Write the artifact and its manifest atomically; returns the manifest.

    With ``key``, the manifest gets ``"signature": {"alg": "hmac-sha256", "value": <hex>}``,
    the HMAC of its canonical JSON (sorted keys, no spaces, signature field left out).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    joblib.dump(artifact, tmp, compress=3)
    digest = sha256_file(tmp)
    manifest = {
        "format_version": artifact.format_version,
        "sha256": digest,
        "detector": getattr(artifact.detector, "name", type(artifact.detector).__name__),
        "trained_at": artifact.trained_at,
        "threshold": artifact.threshold,
        "window": artifact.window,
        "hop": artifact.hop,
        "schema": artifact.schema,
        "feature_names": list(artifact.feature_names),
        "training": artifact.training,
        "versions": artifact.versions,
        "train_stats": {
            "mean": [float(x) for x in artifact.stats.mean],
            "std": [float(x) for x in artifact.stats.std],
            "calibration_windows": len(artifact.stats.calibration_scores),
        },
    }
    if key is not None:
        manifest["signature"] = {"alg": SIGNATURE_ALG, "value": _sign(manifest, key)}
    mtmp = manifest_path(p).with_name(manifest_path(p).name + ".tmp")
    mtmp.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    os.replace(tmp, p)
    os.replace(mtmp, manifest_path(p))
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest beside ``path``: parsed JSON (never unpickled), at most 16 MiB, with a sha256."""
    mp = manifest_path(path)
    try:
        with open(mp, "rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        msg = f"model manifest {mp} not found: the artifact was not written by `itap train`, refusing to load it"
        raise ArtifactError(msg) from None
    except OSError as exc:
        msg = f"model manifest {mp} is unreadable: {exc}"
        raise ArtifactError(msg) from exc
    if len(raw) > MAX_MANIFEST_BYTES:
        msg = f"model manifest {mp} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; not a manifest, refusing to read it"
        raise ArtifactError(msg)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        msg = f"model manifest {mp} is not UTF-8 text ({exc.reason} at byte {exc.start}); refusing to read it"
        raise ArtifactError(msg) from exc
    except (ValueError, RecursionError) as exc:
        msg = f"model manifest {mp} is not valid JSON: {exc}"
        raise ArtifactError(msg) from exc
    if not isinstance(data, dict) or not isinstance(data.get("sha256"), str):
        msg = f"model manifest {mp} has no sha256"
        raise ArtifactError(msg)
    return data


def load(path: str | Path, *, key: bytes | None = None) -> Artifact:
    """Verify the manifest's signature (with ``key``) and the checksum, then unpickle.

    With ``key``, a manifest without a valid signature is refused before the model file
    is even read. Without one, only the sha256 recorded at training is checked, which
    guards against damage, not against whoever can write beside the file. The bytes that
    are hashed are the bytes that are unpickled (read once).
    """
    p = Path(path)
    if not p.is_file():
        msg = f"model artifact not found: {p} (train one with `itap train`, or run `itap demo`)"
        raise ArtifactError(msg)
    manifest = read_manifest(p)
    if key is not None:
        _verify_signature(manifest, key, manifest_path(p))
    try:
        blob = p.read_bytes()
    except OSError as exc:
        msg = f"model artifact {p} could not be read: {exc}"
        raise ArtifactError(msg) from exc
    actual = hashlib.sha256(blob).hexdigest()
    if actual != manifest["sha256"]:
        msg = (
            f"model artifact {p} fails verification: sha256 {actual[:12]}… differs from the "
            f"{manifest['sha256'][:12]}… recorded at training; refusing to load it"
        )
        raise ArtifactError(msg)
    try:
        obj = joblib.load(io.BytesIO(blob))
    except Exception as exc:  # joblib/pickle raise many types; report one
        msg = f"model artifact {p} could not be read: {exc}"
        raise ArtifactError(msg) from exc
    if not isinstance(obj, Artifact):
        msg = f"{p} does not contain an ITAP model artifact (found {type(obj).__name__})"
        raise ArtifactError(msg)
    return obj
