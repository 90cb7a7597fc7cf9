"""Test-only: compute `importlib.metadata.packages_distributions()` once per test session.

transformers and trl each call it while being imported, so every `axolotl train` process (and
every rank) calls it twice. On Python 3.12 it checks that each file listed by each installed
distribution exists: about 83,000 `stat` calls in `.venv-0.21` (CUDA torch alone lists 14,700),
~2 s per call on the CI machine, so ~4 s of the ~15 s of imports in each of the ~180 test
processes of the slow suite. With `BALORA_TEST_METADATA_CACHE` set to a folder (tests/conftest.py
sets it), the first process stores the mapping there as JSON and the others read it back.

The file is keyed by the interpreter and by the names and modification times of every
`*.dist-info` / `*.egg-info` on `sys.path`, so an install or removal during the session makes a
new key and a fresh computation. Each call returns a new dict, as the original does.
`tests/test_metadata_cache.py` checks that what a process reads equals a fresh computation.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import sys
import tempfile
from pathlib import Path

ENV_VAR = "BALORA_TEST_METADATA_CACHE"


def installed_key() -> str:
    """A hash of the interpreter and of every distribution's metadata folder on sys.path."""
    entries = [sys.prefix, sys.version]
    for folder in sys.path:
        directory = folder or "."  # "" on sys.path is the current directory
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if name.endswith((".dist-info", ".egg-info")):
                entries.append(f"{folder}/{name}:{os.stat(os.path.join(directory, name)).st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:24]


def cached_packages_distributions(compute, cache_dir: Path) -> dict[str, list[str]]:
    """`compute()`'s mapping, read from `cache_dir` when this environment stored it already."""
    path = cache_dir / f"packages_distributions-{installed_key()}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    mapping = compute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    with os.fdopen(handle, "w") as file:
        json.dump(mapping, file)
    os.replace(temporary, path)  # atomic: a reader sees the whole file or none
    return mapping


def install() -> None:
    """Route `importlib.metadata.packages_distributions` through the session's cache folder."""
    cache_dir = os.environ.get(ENV_VAR)
    if not cache_dir:
        return
    compute = importlib.metadata.packages_distributions

    @functools.wraps(compute)
    def packages_distributions() -> dict[str, list[str]]:
        return cached_packages_distributions(compute, Path(cache_dir))

    importlib.metadata.packages_distributions = packages_distributions
