"""Which checkpoint a resume may load: never one that a crash left half-written.

The Trainer writes a checkpoint straight into `checkpoint-N/` (adapters, then the
optimizer and scheduler, the RNG states, and `trainer_state.json` last), and Axolotl's
`auto_resume_from_checkpoints` takes the highest N it finds. A rank killed during the
save leaves a folder with the adapters of step N and no optimizer or trainer state;
loading it would restart the step count at 0 from step N's weights, silently.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME

LOG = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def is_complete(checkpoint: Path) -> bool:
    """The Trainer wrote its state, the last file of a checkpoint save."""
    return (checkpoint / TRAINER_STATE_NAME).is_file()


def _step(checkpoint: Path) -> int | None:
    match = _CHECKPOINT.match(checkpoint.name)
    return int(match.group(1)) if match else None


def resume_point(requested: Path) -> Path:
    """`requested` if complete, else the last complete `checkpoint-N` before it in its folder.

    Refuses (naming the folder) when there is none: the run cannot resume, and starting
    over is the user's call. The incomplete folder is left untouched; the resumed run's
    save of that step overwrites it.
    """
    if is_complete(requested):
        return requested
    step = _step(requested)
    earlier = sorted(
        (path for path in requested.parent.glob("checkpoint-*")
         if _step(path) is not None and (step is None or _step(path) < step) and is_complete(path)),
        key=_step,
    )
    if not earlier:
        raise ValueError(
            f"resume_from_checkpoint: {requested} is incomplete (no {TRAINER_STATE_NAME}: the run stopped "
            f"while saving it) and {requested.parent} holds no complete checkpoint before it. Delete "
            f"{requested} and set resume_from_checkpoint / auto_resume_from_checkpoints off to start over, "
            f"or name a complete checkpoint."
        )
    LOG.warning(
        "BA-LoRA: %s is incomplete (no %s: the run stopped while saving it); resuming from %s, the last "
        "complete checkpoint before it (the incomplete folder is left as it is until this run saves that step)",
        requested, TRAINER_STATE_NAME, earlier[-1],
    )
    return earlier[-1]
