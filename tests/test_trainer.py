"""The Trainer mixin on a plain transformers Trainer: loss, accumulation scaling, logging."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from peft import LoraConfig
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from axolotl_balora.core import BALoRAConfig, apply_balora
from tiny_models import perturb_trainable, BALoRATrainer, tiny_llama, token_dataset


class LogRecorder(TrainerCallback):
    def __init__(self):
        self.logs: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


def _dataset(equal_rows: bool = False) -> list[dict[str, torch.Tensor]]:
    """Rows with different numbers of scored tokens, so token weighting matters (or equal ones)."""
    return token_dataset(rows=8, seq=12, seed=3, prompt_length=lambda row: 3 if equal_rows else 2 + row % 5)


def _train(tmp_path, config: BALoRAConfig, micro_batch: int, accumulation: int, steps: int = 1,
           perturb: bool = True, callbacks=(), equal_rows: bool = False,
           configure: Callable[[Trainer], None] = lambda trainer: None, **trainer_kwargs):
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
        model=model, args=args, train_dataset=_dataset(equal_rows), balora_config=config,
        callbacks=list(callbacks), **trainer_kwargs,
    )
    configure(trainer)
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


def _token_normalized_cross_entropy(outputs, labels, num_items_in_batch=None):
    """A user's compute_loss_func: summed CE over the accumulated batch's tokens (or a mean)."""
    logits, targets = outputs.logits[:, :-1].float(), labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum())


def _no_items_count(trainer: Trainer) -> None:
    trainer._get_num_items_in_batch = lambda *args, **kwargs: None


def _model_without_loss_kwargs(trainer: Trainer) -> None:
    trainer.model_accepts_loss_kwargs = False


@pytest.mark.parametrize(
    ("configure", "trainer_kwargs"),
    [
        (lambda trainer: None, {}),
        (_model_without_loss_kwargs, {}),
        (lambda trainer: None, {"compute_loss_func": _token_normalized_cross_entropy}),
        (_model_without_loss_kwargs, {"compute_loss_func": _token_normalized_cross_entropy}),
        (_no_items_count, {"compute_loss_func": _token_normalized_cross_entropy}),
    ],
    ids=["model-loss-token-count", "model-loss-no-count", "compute-loss-func-token-count",
         "compute-loss-func-no-loss-kwargs", "compute-loss-func-no-count"],
)
def test_regularizers_weigh_the_same_under_accumulation_in_every_branch(tmp_path, configure, trainer_kwargs):
    """The update the regularizers add is the same in 2 x 2 accumulated micro-batches as in one of 4.

    Each branch normalizes the task loss differently (by tokens of the accumulated
    batch, or per micro-batch and divided by the accumulation steps, or not at all);
    rows score equally many tokens, so every correct weighting gives the big batch's mean.
    """
    on = BALoRAConfig(lambda_consistency=0.5, lambda_diversity=0.5, lambda_svd=0.0, lambda_schedule="constant")
    off = BALoRAConfig(0.0, 0.0, 0.0, lambda_schedule="constant")
    effects = []
    for micro_batch, accumulation in ((4, 1), (2, 2)):
        runs = [_train(tmp_path, config, micro_batch, accumulation, equal_rows=True, configure=configure,
                       **trainer_kwargs)[0] for config in (on, off)]
        effects.append({name: runs[0][name] - runs[1][name] for name in runs[0]})
    big, accumulated = effects
    size = max(value.abs().max().item() for value in big.values())
    assert size > 1e-4
    assert _max_difference(big, accumulated) < 1e-3 * size


def test_regularizers_scale_with_the_parents_device_factor(tmp_path, monkeypatch):
    """average_tokens_across_devices: the parent multiplies a token-normalized loss by the
    process count; the regularizers must be multiplied alike (2 processes faked)."""
    model = apply_balora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    perturb_trainable(model, seed=5, scale=0.05)
    model.train()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                             average_tokens_across_devices=True)
    trainer = BALoRATrainer(model=model, args=args, balora_config=BALoRAConfig(
        lambda_consistency=0.5, lambda_diversity=0.5, lambda_svd=0.2, lambda_schedule="constant"))
    batch = {key: torch.stack([row[key] for row in _dataset()[:2]]) for key in ("input_ids", "labels")}
    items = (batch["labels"][:, 1:] != -100).sum() * 3  # this micro-batch holds a third of the tokens
    single = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
    doubled = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
    torch.testing.assert_close(doubled, 2 * single, rtol=1e-6, atol=0)


@pytest.mark.parametrize("chunk_size", [256, 0], ids=["fused", "plain"])
def test_reference_forward_draws_the_training_forwards_dropout_masks(tmp_path, chunk_size):
    """On a base with dropout (GPT-2 style), step-0 consistency is 0: same masks, not two draws."""
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2))
    model = apply_balora(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                          lora_dropout=0.0))
    model.train()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = BALoRATrainer(model=model, args=args, balora_config=BALoRAConfig(
        lambda_consistency=1.0, lambda_diversity=0.0, lambda_svd=0.0, lambda_schedule="constant",
        chunk_size=chunk_size))
    batch = {key: torch.stack([row[key] for row in _dataset()[:2]]) for key in ("input_ids", "labels")}
    trainer.compute_loss(model, batch)
    assert trainer.balora_loss_path.startswith("fused" if chunk_size else "plain")
    logs = trainer._balora_tally.reduce_and_reset(trainer.accelerator, trainer.args.device)
    assert logs["balora/consistency"] < 1e-9
    with torch.no_grad():  # without the replay the two forwards would see different masks
        noisy = [model(input_ids=batch["input_ids"]).logits for _ in range(2)]
    assert (noisy[0] - noisy[1]).abs().max() > 1e-2


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
