"""Shared fixtures: offline tiny models and datasets, and quiet, hub-free environment."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from axolotl_cli import CPU_DISTRIBUTED_DIR, PREPARED_DATASETS_ENV, pythonpath_with
from tiny_assets import arithmetic_records, build_tiny_llama, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# The plugin caches PiSSA factors by default; tests (and their subprocesses) never touch ~/.cache.
# A folder made here is removed when the session ends (pytest_sessionfinish).
_OWN_INIT_CACHE = None if "BALORA_INIT_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="balora-init-cache-")
if _OWN_INIT_CACHE is not None:
    os.environ["BALORA_INIT_CACHE_DIR"] = _OWN_INIT_CACHE
# Every test subprocess starts with tests/cpu_distributed on PYTHONPATH: its sitecustomize reads
# `packages_distributions()` from this session's folder instead of recomputing it (~4 s of each
# `axolotl train` process on Python 3.12; tests/cpu_distributed/metadata_cache.py). xdist workers
# inherit the controller's folder.
os.environ["PYTHONPATH"] = pythonpath_with(CPU_DISTRIBUTED_DIR)
_OWN_METADATA_CACHE = None if "BALORA_TEST_METADATA_CACHE" in os.environ else tempfile.mkdtemp(
    prefix="balora-metadata-cache-")
if _OWN_METADATA_CACHE is not None:
    os.environ["BALORA_TEST_METADATA_CACHE"] = _OWN_METADATA_CACHE

# The prepared datasets of every `axolotl train` run of the session (tests/axolotl_cli.py).
_OWN_PREPARED = None if PREPARED_DATASETS_ENV in os.environ else tempfile.mkdtemp(prefix="balora-prepared-")
if _OWN_PREPARED is not None:
    os.environ[PREPARED_DATASETS_ENV] = _OWN_PREPARED


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for folder in (_OWN_INIT_CACHE, _OWN_METADATA_CACHE, _OWN_PREPARED):
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(arithmetic_records(96, seed=1), tmp_path_factory.mktemp("data") / "train.jsonl")
