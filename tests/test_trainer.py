"""The Trainer mixin on a plain transformers Trainer: loss, accumulation scaling, logging."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import Trainer, TrainerCallback, TrainingArguments

from axolotl_balora.core import BALoRAConfig, apply_balora
from tiny_models import perturb_trainable, BALoRATrainer, tiny_llama, token_dataset


class LogRecorder(TrainerCallback):
    def __init__(self):
        self.logs: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


def _dataset() -> list[dict[str, torch.Tensor]]:
    """Rows with different numbers of scored tokens, so token weighting matters."""
    return token_dataset(rows=8, seq=12, seed=3, prompt_length=lambda row: 2 + row % 5)


def _train(tmp_path, config: BALoRAConfig, micro_batch: int, accumulation: int, steps: int = 1,
           perturb: bool = True, callbacks=()):
    model = apply_balora(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), init="pissa"
    )
    if perturb:  # move off the init so the consistency term has a gradient too
        perturb_trainable(model, seed=5, scale=0.05)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    args = TrainingArguments(
        output_dir=str(tmp_path / f"out-{micro_batch}-{accumulation}"),
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = BALoRATrainer(
        model=model, args=args, train_dataset=_dataset(), balora_config=config, callbacks=list(callbacks)
    )
    trainer.train()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return trained, base_before, model


def _max_difference(first: dict, second: dict) -> float:
    return max((first[k] - second[k]).abs().max().item() for k in first)


def test_accumulation_matches_one_big_batch(tmp_path):
    config = BALoRAConfig(lambda_consistency=0.5, lambda_diversity=0.5, lambda_svd=0.0,
                          lambda_schedule="constant")
    big, _, _ = _train(tmp_path, config, micro_batch=4, accumulation=1)
    accumulated, _, _ = _train(tmp_path, config, micro_batch=2, accumulation=2)
    unregularized, _, _ = _train(
        tmp_path, BALoRAConfig(0.0, 0.0, 0.0, lambda_schedule="constant"), micro_batch=4, accumulation=1
    )
    regularizer_effect = _max_difference(big, unregularized)
    assert regularizer_effect > 1e-4  # the regularizers move the weights measurably
    assert _max_difference(big, accumulated) < 1e-3 * regularizer_effect + 1e-6


def test_logs_terms_and_lambdas_and_keeps_base_weights(tmp_path):
    recorder = LogRecorder()
    config = BALoRAConfig(lambda_schedule="paper")
    _, base_before, model = _train(tmp_path, config, micro_batch=2, accumulation=1, steps=5,
                                   perturb=False, callbacks=[recorder])
    assert len(recorder.logs) == 5
    first = recorder.logs[0]
    for key in ("consistency", "diversity", "svd", "lambda_consistency", "lambda_diversity", "lambda_svd"):
        assert f"balora/{key}" in first, first
    assert abs(first["balora/consistency"]) < 1e-6
    assert first["balora/lambda_consistency"] == pytest.approx(0.025)
    assert first["balora/lambda_diversity"] == 0.0  # paper schedule: off for the first 20%
    assert recorder.logs[-1]["balora/lambda_diversity"] == pytest.approx(0.005)
    assert recorder.logs[-1]["balora/consistency"] > 0
    base_after = {n: p for n, p in model.named_parameters() if "base_layer" in n}
    assert base_before.keys() == base_after.keys() and base_before
    assert all(torch.equal(base_before[n], base_after[n]) for n in base_before)


def test_evaluation_loss_is_the_task_loss(tmp_path):
    model = apply_balora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                             per_device_eval_batch_size=4)
    data = _dataset()
    trainer = BALoRATrainer(model=model, args=args, eval_dataset=data,
                            balora_config=BALoRAConfig(lambda_schedule="constant", lambda_diversity=10.0))
    plain = Trainer(model=model, args=args, eval_dataset=data)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], rel=1e-6)
