"""The core stays pure: no network, database, clock, threads or environment inside."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "itap_stream" / "core"
FORBIDDEN_MODULES = {
    "socket", "threading", "asyncio", "subprocess", "os", "time", "queue", "sqlalchemy", "paho",
    "prometheus_client", "joblib", "requests", "urllib", "http", "itap_stream.adapters", "itap_stream.app",
    "itap_stream.config", "random",
}  # fmt: skip
FORBIDDEN_CALLS = {"now", "utcnow", "today", "getenv", "time"}


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_is_pure(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            names = []
        for name in names:
            root_hits = {m for m in FORBIDDEN_MODULES if name == m or name.startswith(m + ".")}
            assert not root_hits, f"{path.name} imports {name}: the core must not do I/O, time or threads"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            assert node.func.attr not in FORBIDDEN_CALLS, f"{path.name} calls .{node.func.attr}(): inject time instead"
