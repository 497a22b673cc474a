"""Model artifact files: ``<name>.joblib`` plus a ``<name>.joblib.json`` manifest.

The manifest (plain JSON, safe to read) records the sha256 of the joblib file and the
metadata an operator wants without unpickling: schema, features, threshold, training
summary, library versions. `load` verifies the checksum *before* unpickling, so a
tampered or foreign file is refused instead of executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import joblib

from itap_stream.core.model import Artifact
from itap_stream.errors import ArtifactError

__all__ = ["library_versions", "load", "manifest_path", "read_manifest", "save", "sha256_file"]


def manifest_path(path: str | Path) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".json")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def save(artifact: Artifact, path: str | Path) -> dict[str, Any]:
    """Write the artifact and its manifest atomically; returns the manifest."""
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
    mtmp = manifest_path(p).with_name(manifest_path(p).name + ".tmp")
    mtmp.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    os.replace(tmp, p)
    os.replace(mtmp, manifest_path(p))
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    mp = manifest_path(path)
    try:
        data = json.loads(mp.read_text(encoding="utf-8"))
    except FileNotFoundError:
        msg = f"model manifest {mp} not found: the artifact was not written by `itap train`, refusing to load it"
        raise ArtifactError(msg) from None
    except (OSError, ValueError) as exc:
        msg = f"model manifest {mp} is unreadable: {exc}"
        raise ArtifactError(msg) from exc
    if not isinstance(data, dict) or not isinstance(data.get("sha256"), str):
        msg = f"model manifest {mp} has no sha256"
        raise ArtifactError(msg)
    return data


def load(path: str | Path) -> Artifact:
    """Verify the checksum recorded at training, then unpickle."""
    p = Path(path)
    if not p.is_file():
        msg = f"model artifact not found: {p} (train one with `itap train`, or run `itap demo`)"
        raise ArtifactError(msg)
    manifest = read_manifest(p)
    actual = sha256_file(p)
    if actual != manifest["sha256"]:
        msg = (
            f"model artifact {p} fails verification: sha256 {actual[:12]}… differs from the "
            f"{manifest['sha256'][:12]}… recorded at training; refusing to load it"
        )
        raise ArtifactError(msg)
    try:
        obj = joblib.load(p)
    except Exception as exc:  # joblib/pickle raise many types; report one
        msg = f"model artifact {p} could not be read: {exc}"
        raise ArtifactError(msg) from exc
    if not isinstance(obj, Artifact):
        msg = f"{p} does not contain an ITAP model artifact (found {type(obj).__name__})"
        raise ArtifactError(msg)
    return obj
