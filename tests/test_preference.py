"""BA-LoRA on TRL's own preference trainers, in process: the terms against a plain recomputation.

DPO stands for the trainers that score `completion_mask` tokens and run an adapter-disabled
reference forward themselves (DPO, IPO, KTO); CPO with the SimPO loss for those that score a
concatenated chosen + rejected batch and run no reference (ORPO, SimPO).
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer

from axolotl_balora.core import BALoRAConfig, apply_balora
from axolotl_balora.core.adapter.names import FROZEN_ADAPTER, TRAINABLE_ADAPTER
from axolotl_balora.core.adapter.pissa_init import check_frozen_factors_active
from axolotl_balora.core.ops.losses import IGNORE_INDEX
from axolotl_balora.core.ops.regularizers import plain_regularizer_terms
from axolotl_balora.core.ops.schedules import lambdas_at
from axolotl_balora.core.training.preference import BALoRAPreferenceMixin
from axolotl_balora.core.training.trainer_base import BALoRATrainerBase
from tiny_assets import preference_records
from tiny_models import perturb_trainable

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
TERMS_ON = BALoRAConfig(lambda_consistency=0.5, lambda_diversity=0.1, lambda_svd=0.1, lambda_schedule="constant")


class BALoRADPO(BALoRAPreferenceMixin, DPOTrainer):
    pass


class BALoRACPO(BALoRAPreferenceMixin, CPOTrainer):
    pass


def _pairs() -> Dataset:
    return Dataset.from_list([
        {"prompt": pair["messages"][0]["content"], "chosen": " " + pair["chosen"][-1]["content"],
         "rejected": " " + pair["rejected"][-1]["content"]}
        for pair in preference_records(8, seed=2)
    ])


def _common(tmp_path) -> dict:
    return dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1, report_to=[],
                use_cpu=True, save_strategy="no", learning_rate=0.0, max_length=64)


def _dpo(tmp_path, model_dir, config: BALoRAConfig, **args) -> BALoRADPO:
    """As axolotl builds it: the base model and a LoRA config (TRL would build a plain LoRA from it)."""
    torch.manual_seed(0)
    return BALoRADPO(model=AutoModelForCausalLM.from_pretrained(model_dir), args=DPOConfig(**_common(tmp_path), **args),
                     train_dataset=_pairs(), processing_class=AutoTokenizer.from_pretrained(model_dir),
                     peft_config=LoraConfig(**LORA), balora_config=config)


def _simpo(tmp_path, model_dir, config: BALoRAConfig) -> BALoRACPO:
    """As axolotl builds it: the BA-LoRA model already built, no LoRA config."""
    model = apply_balora(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(**LORA))
    args = CPOConfig(**_common(tmp_path), loss_type="simpo", simpo_gamma=0.5, cpo_alpha=0.0)
    return BALoRACPO(model=model, args=args, train_dataset=_pairs(),
                     processing_class=AutoTokenizer.from_pretrained(model_dir), balora_config=config)


def _first_batch(trainer) -> dict:
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _scored(trainer, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(input ids, labels of the scored completion tokens, model kwargs), rebuilt from the batch."""
    if "completion_mask" in batch:
        ids = batch["input_ids"]
        labels = torch.where(batch["completion_mask"].bool(), ids, torch.full_like(ids, IGNORE_INDEX))
        return ids, labels, {"attention_mask": batch["attention_mask"]}
    concatenated = CPOTrainer.concatenated_inputs(batch, padding_value=trainer.pad_token_id)
    return (concatenated["concatenated_input_ids"], concatenated["concatenated_labels"],
            {"attention_mask": concatenated["concatenated_attention_mask"]})


def _expected_loss(trainer, batch: dict) -> torch.Tensor:
    """The parent trainer's own loss plus the plain terms from a policy and a reference forward."""
    model = trainer.model
    task_loss = super(BALoRATrainerBase, trainer).compute_loss(model, batch)  # the TRL trainer's own
    ids, labels, kwargs = _scored(trainer, batch)
    logits = model(input_ids=ids, **kwargs).logits
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(input_ids=ids, **kwargs).logits
    lambdas = lambdas_at(trainer.balora_config, 0, 1)
    return task_loss + plain_regularizer_terms(logits, ref_logits, labels, trainer.balora_config, lambdas
                                               ).weighted_sum(lambdas)


def test_dpo_reference_is_the_pretrained_model_so_the_first_loss_is_ln2(tmp_path, tiny_llama_dir):
    trainer = _dpo(tmp_path, tiny_llama_dir, BALoRAConfig(lambda_consistency=0, lambda_diversity=0, lambda_svd=0))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, _first_batch(trainer))
    assert abs(loss.item() - math.log(2)) < 1e-6


def test_dpo_keeps_only_the_balora_adapters_active(tmp_path, tiny_llama_dir):
    """TRL adds a "ref" copy of the trained adapter (W + s B0 A0 without the frozen factors): removed."""
    model = _dpo(tmp_path, tiny_llama_dir, TERMS_ON).model
    assert set(model.peft_config) == {TRAINABLE_ADAPTER, FROZEN_ADAPTER}
    check_frozen_factors_active(model)
    assert model.balora_init_method == "pissa"


@pytest.mark.parametrize("build", [_dpo, _simpo], ids=["dpo-reuses-its-reference", "simpo-own-reference"])
def test_loss_is_the_trainers_loss_plus_the_plain_terms(tmp_path, tiny_llama_dir, build):
    trainer = build(tmp_path, tiny_llama_dir, TERMS_ON)
    perturb_trainable(trainer.model, seed=4, scale=0.05)  # off the init: every term is non-zero
    trainer.model.train()
    batch = _first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    logs = trainer._balora_tally.reduce_and_reset(trainer.accelerator, trainer.args.device)
    assert logs["balora/consistency"] > 1e-4 and logs["balora/diversity"] < 0 and logs["balora/svd"] < 0
    torch.testing.assert_close(loss, _expected_loss(trainer, batch), rtol=1e-6, atol=1e-6)


def test_a_precomputed_reference_gets_one_reference_forward_of_the_mixin(tmp_path, tiny_llama_dir):
    """With reference log-probs precomputed TRL runs no reference forward; the consistency term needs one."""
    trainer = _dpo(tmp_path, tiny_llama_dir, TERMS_ON, precompute_ref_log_probs=True)
    perturb_trainable(trainer.model, seed=4, scale=0.05)
    trainer.model.train()
    batch = _first_batch(trainer)
    assert "ref_chosen_logps" in batch
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), _expected_loss(trainer, batch),
                               rtol=1e-6, atol=1e-6)
