"""Shared fixtures: offline tiny models and datasets, and quiet, hub-free environment."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from axolotl_cli import CPU_DISTRIBUTED_DIR, PREPARED_DATASETS_ENV, SUBPROCESS_TMPDIR_ENV, pythonpath_with
from cpu_distributed import gc_freeze
from tiny_assets import arithmetic_records, build_tiny_llama, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def _session_folder(variable: str, prefix: str) -> str | None:
    """A temporary folder named by `variable` for this session and its subprocesses, unless the
    caller set one (xdist workers inherit the controller's); the folder made here, else None."""
    if variable in os.environ:
        return None
    os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
    return os.environ[variable]


# The plugin caches PiSSA factors by default; tests (and their subprocesses) never touch ~/.cache.
# Folders made here are removed when the session ends (pytest_sessionfinish).
_OWN_FOLDERS = [_session_folder("BALORA_INIT_CACHE_DIR", "balora-init-cache-")]
# Every test subprocess starts with tests/cpu_distributed on PYTHONPATH: its sitecustomize reads
# `packages_distributions()` from this session's folder instead of recomputing it (~4 s of each
# `axolotl train` process on Python 3.12; tests/cpu_distributed/metadata_cache.py).
os.environ["PYTHONPATH"] = pythonpath_with(CPU_DISTRIBUTED_DIR)
_OWN_FOLDERS.append(_session_folder("BALORA_TEST_METADATA_CACHE", "balora-metadata-cache-"))
# Full garbage collections skip what survived the last one, here and in every test subprocess
# (tests/cpu_distributed/gc_freeze.py); BALORA_TEST_GC_FREEZE=0 turns it off to compare.
os.environ.setdefault(gc_freeze.ENV_VAR, "1")
gc_freeze.install()
# The prepared datasets of every `axolotl train` run of the session (tests/axolotl_cli.py).
_OWN_FOLDERS.append(_session_folder(PREPARED_DATASETS_ENV, "balora-prepared-"))
# TMPDIR of the `axolotl` and torchrun subprocesses (tests/axolotl_cli.py `subprocess_tmpdir`):
# their leftovers (27 empty `torchelastic_*` folders in one CI run's slow suite, 2026-12-07) go
# with the session. Not this session's own TMPDIR: xdist workers would inherit it, and pytest's
# `tmp_path` folders, kept for a look after a failure, would go too.
_OWN_FOLDERS.append(_session_folder(SUBPROCESS_TMPDIR_ENV, "balora-tmp-"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for folder in _OWN_FOLDERS:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(arithmetic_records(96, seed=1), tmp_path_factory.mktemp("data") / "train.jsonl")
