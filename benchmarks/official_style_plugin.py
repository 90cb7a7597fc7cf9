"""The official-style cost model (official_style.py) as an Axolotl plugin, for `overhead_cli.py`.

With `adapter: lora` and `peft_init_lora_weights: pissa_niter_N`, Axolotl builds PEFT's
own PiSSA adapter (W overwritten by its residual); this plugin keeps a deep copy of the
model taken just before that as the separate reference, and gives Axolotl a trainer
whose loss is `official_style_loss`. Not part of the package.
"""

from __future__ import annotations

import copy

from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.integrations.base import BasePlugin

from official_style import OfficialStyleLossMixin


class OfficialStyleAxolotlTrainer(OfficialStyleLossMixin, AxolotlTrainer):
    """Axolotl's trainer with the official-style loss."""


class OfficialStylePlugin(BasePlugin):
    """`plugins: [official_style_plugin.OfficialStylePlugin]` with benchmarks/ on PYTHONPATH."""

    def __init__(self) -> None:
        super().__init__()
        self.reference = None

    def pre_lora_load(self, cfg, model):
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def get_trainer_cls(self, cfg):
        return OfficialStyleAxolotlTrainer

    def post_trainer_create(self, cfg, trainer):
        trainer.reference = self.reference
