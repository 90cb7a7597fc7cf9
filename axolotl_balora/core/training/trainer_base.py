"""What every BA-LoRA trainer shares, whatever its loss: options, checkpoints, resume, logs.

The supervised mixin (`trainer.py`) and the preference mixin (`preference.py`) differ only
in how they add the terms to their parent's loss; saving the standard export, resuming from
the raw adapters, reloading the best checkpoint and logging the terms are the same for both.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ..adapter.checkpoint import check_compatible, load_training_state
from ..adapter.export import is_balora_model, save_sharded_balora_adapter
from ..adapter.names import TRAINING_STATE_DIR
from ..adapter.pissa_init import activate_balora_adapters, restore_frozen_factor_buffers
from ..config import BALoRAConfig
from ..ops.regularizers import RegularizerTerms
from ..ops.schedules import Lambdas
from .resume_point import resume_point
from .term_tally import TermTally

LOG = logging.getLogger(__name__)


def _fsdp2_sharded_state_dict(trainer: Any) -> bool:
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) if trainer.is_fsdp_enabled else None
    return (plugin is not None and getattr(plugin, "fsdp_version", 1) == 2
            and "SHARDED_STATE_DICT" in str(plugin.state_dict_type))


class _FrozenFactorsStayBuffers(TrainerCallback):
    """At train begin (after the engine wrapped and, with rank-0 loading, re-loaded the model),
    before any forward: the frozen factors are buffers again if a loader made them parameters."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        restored = restore_frozen_factor_buffers(model) if model is not None else 0
        if restored:
            LOG.info("BA-LoRA: %d frozen factors came back from the engine's loading as parameters; "
                     "kept as buffers (never trained, never clipped)", restored)


class BALoRATrainerBase:
    """The Trainer hooks every BA-LoRA loss needs: put a subclass of it first in the bases."""

    def __init__(self, *args: Any, balora_config: BALoRAConfig | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.balora_config = balora_config or BALoRAConfig()
        self._balora_tally = TermTally()
        self.add_callback(_FrozenFactorsStayBuffers())

    # -- checkpoints --------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """Resume from a complete checkpoint only, and refuse one of another adapter layout or
        init, before anything loads it.

        A checkpoint a crash left half-written is replaced by the last complete one before it
        (`resume_point.py`). DeepSpeed resumes through its own checkpoint loader, never through
        `_load_from_checkpoint`; the checks must not depend on which engine runs.
        """
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, Path)):
            checkpoint = resume_point(Path(checkpoint))
            resume_from_checkpoint = str(checkpoint)
            if (checkpoint / TRAINING_STATE_DIR).is_dir():
                check_compatible(self.accelerator.unwrap_model(self.model), checkpoint / TRAINING_STATE_DIR)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Also write the rank-2r export (and TRAINING_STATE_DIR) where FSDP2 saves DCP shards only.

        With `SHARDED_STATE_DICT` the Trainer's own save of a checkpoint writes no adapter file;
        the export gathers just the adapter tensors (small) on every rank, as for the final save.
        Resuming then takes the same TRAINING_STATE_DIR route as every other engine.
        """
        super().save_model(output_dir, _internal_call)
        peft_model = self.accelerator.unwrap_model(self.model)
        if _fsdp2_sharded_state_dict(self) and is_balora_model(peft_model):
            save_sharded_balora_adapter(peft_model, output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume from the raw adapters under TRAINING_STATE_DIR, not the rank-2r export."""
        state_dir = Path(resume_from_checkpoint) / TRAINING_STATE_DIR
        peft_model = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not state_dir.is_dir():
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        LOG.info("BA-LoRA: resuming adapters from %s", state_dir)
        load_training_state(peft_model, state_dir)
        activate_balora_adapters(peft_model)

    def _load_best_model(self) -> None:
        """`load_best_model_at_end` (early stopping): reload the best checkpoint's raw adapters.

        The Trainer would load the checkpoint's adapter file into the live adapter, but that
        file is the rank-2r export and the live adapter has rank r. DeepSpeed and FSDP reload
        their own engine state, which holds the raw adapters already.
        """
        best = self.state.best_model_checkpoint
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not (Path(best) / TRAINING_STATE_DIR).is_dir():
            super()._load_best_model()
            return
        LOG.info("BA-LoRA: loading the best checkpoint %s (%s = %s)", best, self.args.metric_for_best_model,
                 self.state.best_metric)
        self._load_from_checkpoint(best)

    # -- logging ------------------------------------------------------------
    def _record(self, terms: RegularizerTerms, lambdas: Lambdas, task: torch.Tensor | float,
                total: torch.Tensor | float) -> None:
        """One micro-batch's terms, and its task loss and returned loss (for `balora/task_loss`)."""
        self._balora_tally.add(terms, lambdas, task, total)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Attach each term's mean since the last training log, over every rank (skips summed),
        and the task loss without the terms.

        The Trainer logs on every rank at the same steps, so the one reduction here
        is collective-safe; it is the only host sync the terms cost.
        """
        if "loss" in logs and self._balora_tally.micro_batches:
            logs.update(self._balora_tally.reduce_and_reset(self.accelerator, self.args.device, logs["loss"]))
        super().log(logs, *args, **kwargs)
