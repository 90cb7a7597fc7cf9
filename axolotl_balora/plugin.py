"""The Axolotl plugin: thin glue from YAML keys and Axolotl hooks to the core.

Declares the `balora` adapter (LoRA-like, so every `lora_*` key applies),
builds the adapter with the core's PiSSA init, and hands Axolotl a trainer
that is Axolotl's own with the BA-LoRA loss mixed in.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from axolotl.loaders.adapter import load_lora
from axolotl.utils.dict import DictDefault
from transformers import PreTrainedModel, Trainer

from . import kernels
from .args import ADAPTER_NAME, config_from_mapping
from .core.adapter.pissa_init import apply_balora
from .core.training.trainer import BALoRATrainerMixin
from .core.training.trainer_base import BALoRATrainerBase
from .preference_trainers import balora_preference_trainer
from .patches import fsdp2_adapter_save, kernel_parameters, plugin_names

LOG = logging.getLogger(__name__)


class BALoRATrainer(BALoRATrainerMixin, AxolotlTrainer):
    """Axolotl's trainer with the BA-LoRA regularizers added to the loss."""


def _is_balora(cfg: DictDefault) -> bool:
    return cfg.adapter == ADAPTER_NAME


class BALoRAPlugin(BasePlugin):
    """`plugins: [axolotl_balora.BALoRAPlugin]` + `adapter: balora` in an Axolotl YAML."""

    def register(self, cfg: dict) -> None:
        """Show this package's progress logs the way Axolotl shows its own."""
        package_logger = logging.getLogger("axolotl_balora")
        axolotl_logger = logging.getLogger("axolotl")
        package_logger.setLevel(axolotl_logger.level)
        for handler in axolotl_logger.handlers:
            if handler not in package_logger.handlers:
                package_logger.addHandler(handler)
        package_logger.propagate = False
        for name in cfg.get("plugins") or []:
            if name in plugin_names.ALIASES:
                LOG.info("BA-LoRA: plugins: %r read as %r", name, plugin_names.PLUGIN_NAME)

    def get_input_args(self) -> str:
        return "axolotl_balora.args.BALoRAArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        return [AdapterCapabilities(name=ADAPTER_NAME, lora_like=True)]

    def pre_model_load(self, cfg: DictDefault) -> None:
        """Before axolotl patches its fused LoRA kernels in, let them take BA-LoRA's stacked pair."""
        if _is_balora(cfg) and any(cfg.get(key) for key in kernels.KERNEL_KEYS):
            kernel_parameters.install()

    def post_model_load(self, cfg: DictDefault, model: PreTrainedModel) -> None:
        """Keep the training model: Axolotl's RL builder hands a plugin's trainer class no model."""
        if _is_balora(cfg):
            self._training_model = model
        if _is_balora(cfg) and any(cfg.get(key) for key in kernels.KERNEL_KEYS):
            kernel_parameters.report_patched_layers(model)

    def post_model_build(self, cfg: DictDefault, model: PreTrainedModel) -> None:
        """Axolotl enables gradient checkpointing before adapters only for lora/qlora; do it for balora."""
        if _is_balora(cfg) and cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=cfg.gradient_checkpointing_kwargs
            )
            LOG.info("BA-LoRA: gradient checkpointing enabled on the base model")

    def load_adapter(self, model: PreTrainedModel, cfg: DictDefault, inference: bool = False,
                     config_only: bool = False):
        """Build the BA-LoRA adapter for training; loading a saved adapter is Axolotl's job."""
        if not _is_balora(cfg) or inference or config_only or cfg.lora_model_dir:
            return None
        _, lora_config = load_lora(model, cfg, config_only=True)
        cache = config_from_mapping(dict(cfg)).init_cache_dir()
        LOG.info("BA-LoRA: building adapter (init=%s, r=%s, factor cache: %s)", cfg.balora_init, cfg.lora_r,
                 cache or "off")
        peft_model = apply_balora(model, lora_config, init=cfg.balora_init, init_cache=cache)
        peft_model.print_trainable_parameters()
        # The factors are set: the trainable pair is not PEFT's identity init (`False`). Axolotl
        # 0.21 re-draws every lora_A (trainable and frozen alike) after `load_adapter` when the
        # returned config says `init_lora_weights: True` (`reinit_lora_from_seed`), which broke
        # the cancellation at step 0; the model's own adapter configs are left as they are.
        return peft_model, replace(lora_config, init_lora_weights=False)

    def get_trainer_cls(self, cfg: DictDefault) -> type[Trainer] | None:
        """Axolotl's SFT trainer, or its trainer for the `rl:` value, with the BA-LoRA terms added."""
        if not _is_balora(cfg):
            return None
        if cfg.rl:
            rl = str(getattr(cfg.rl, "value", cfg.rl))
            return balora_preference_trainer(rl, getattr(self, "_training_model", None),
                                             config_from_mapping(dict(cfg)))
        return BALoRATrainer

    def post_trainer_create(self, cfg: DictDefault, trainer: Trainer) -> None:
        if _is_balora(cfg) and isinstance(trainer, BALoRATrainerBase):
            trainer.balora_config = config_from_mapping(dict(cfg))
            fsdp2_adapter_save.install()
            LOG.info("BA-LoRA regularizers: %s", trainer.balora_config.as_dict())
