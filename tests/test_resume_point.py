"""A checkpoint a crash left half-written is never resumed from (`training/resume_point.py`).

The 2-rank runs that kill a rank during a save are in tests/test_faults.py; these pin the
rule on folders laid out as the Trainer leaves them.
"""

from __future__ import annotations

import logging

import pytest

from axolotl_balora.core.training.resume_point import is_complete, resume_point


def _checkpoint(folder, step: int, complete: bool):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"weights")  # the adapters come first
    if complete:
        (path / "trainer_state.json").write_text("{}")  # the Trainer's last file
    return path


def test_a_complete_checkpoint_is_resumed_from_as_named(tmp_path):
    _checkpoint(tmp_path, 2, complete=True)
    last = _checkpoint(tmp_path, 4, complete=True)
    assert resume_point(last) == last


def test_a_torn_checkpoint_gives_way_to_the_last_complete_one_before_it(tmp_path, caplog):
    _checkpoint(tmp_path, 2, complete=True)
    second = _checkpoint(tmp_path, 10, complete=True)
    _checkpoint(tmp_path, 12, complete=False)  # another torn one, before the requested
    torn = _checkpoint(tmp_path, 20, complete=False)
    _checkpoint(tmp_path, 30, complete=True)  # after the requested: never taken
    with caplog.at_level(logging.WARNING, logger="axolotl_balora"):
        assert resume_point(torn) == second
    assert str(torn) in caplog.text and "incomplete" in caplog.text and str(second) in caplog.text
    assert not is_complete(torn) and (torn / "adapter_model.safetensors").read_bytes() == b"weights"


def test_a_torn_checkpoint_without_an_earlier_one_is_refused_naming_the_folder(tmp_path):
    torn = _checkpoint(tmp_path, 2, complete=False)
    with pytest.raises(ValueError, match="resume_from_checkpoint: .*checkpoint-2 is incomplete") as error:
        resume_point(torn)
    assert "Delete" in str(error.value)
