"""The test session's `packages_distributions` cache (tests/cpu_distributed/metadata_cache.py) gives
test subprocesses exactly what Python computes, and recomputes when the installed set changes."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

from cpu_distributed import metadata_cache
from cpu_distributed.metadata_cache import cached_packages_distributions

PRINT_MAPPING = "import importlib.metadata, json; print(json.dumps(importlib.metadata.packages_distributions()))"


def _subprocess_mapping(cache_dir: Path) -> dict[str, list[str]]:
    env = {**os.environ, metadata_cache.ENV_VAR: str(cache_dir),
           "PYTHONPATH": str(Path(metadata_cache.__file__).parent)}
    result = subprocess.run([sys.executable, "-c", PRINT_MAPPING], env=env, capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout)


def test_subprocesses_store_then_read_what_python_computes(tmp_path):
    first = _subprocess_mapping(tmp_path)
    stored = list(tmp_path.glob("packages_distributions-*.json"))
    assert len(stored) == 1, "the start-up hook did not store the mapping"
    assert first == importlib.metadata.packages_distributions()
    # The second process reads the file: make that visible by marking what is stored.
    stored[0].write_text(json.dumps({**first, "marker_from_the_cache": ["cached"]}))
    assert _subprocess_mapping(tmp_path)["marker_from_the_cache"] == ["cached"]


def test_an_install_during_the_session_makes_a_new_key(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    calls = []

    def compute() -> dict[str, list[str]]:
        calls.append(1)
        return {"torch": ["torch"]}

    cache = tmp_path / "cache"
    assert cached_packages_distributions(compute, cache) == {"torch": ["torch"]}
    assert cached_packages_distributions(compute, cache) == {"torch": ["torch"]}
    assert len(calls) == 1
    (site / "newpkg-1.0.dist-info").mkdir()
    cached_packages_distributions(compute, cache)
    assert len(calls) == 2
    assert len(list(cache.glob("packages_distributions-*.json"))) == 2


def test_each_call_returns_its_own_dict(tmp_path):
    cache = tmp_path / "cache"
    first = cached_packages_distributions(lambda: {"torch": ["torch"]}, cache)
    first["torch"].append("changed by a caller")
    assert cached_packages_distributions(lambda: {}, cache) == {"torch": ["torch"]}
