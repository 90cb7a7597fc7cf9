"""Axolotl's own trainer class for each `rl:` value, with BA-LoRA's terms mixed in.

Axolotl's RL builder asks plugins for a trainer class first and, when one answers,
passes it neither the model nor the reference model (it passes those positionally only
to its own classes) but still TRL's keyword arguments. So the class handed back here is
Axolotl's class for that `rl:` value under `BALoRAPreferenceMixin`, and it is given the
training model the plugin saw loaded.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import Trainer

from .core.config import BALoRAConfig
from .core.training.preference import BALoRAPreferenceMixin

def axolotl_trainer_class(rl: str) -> type[Trainer]:
    """The class Axolotl's RL builder itself picks for `rl` (imported lazily: it pulls in TRL)."""
    if rl in ("dpo", "ipo"):
        from axolotl.core.trainers.dpo import DPOStrategy

        return DPOStrategy.get_trainer_class()
    from axolotl.core.trainers import trl as axolotl_trl

    return {"kto": axolotl_trl.AxolotlKTOTrainer, "orpo": axolotl_trl.AxolotlORPOTrainer,
            "simpo": axolotl_trl.AxolotlCPOTrainer}[rl]


def balora_preference_trainer(rl: str, model: nn.Module | None, config: BALoRAConfig) -> type[Trainer]:
    """A subclass of Axolotl's trainer for `rl` that adds the terms and receives `model`."""
    parent = axolotl_trainer_class(rl)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not args and "model" not in kwargs:
            kwargs["model"] = model
        kwargs.setdefault("balora_config", config)
        BALoRAPreferenceMixin.__init__(self, *args, **kwargs)

    return type(f"BALoRA{parent.__name__}", (BALoRAPreferenceMixin, parent),
                {"__init__": __init__, "__doc__": f"{parent.__name__} with the BA-LoRA terms added to its loss."})
