"""No host sync on the hot path: the loss of a training micro-step never reads a tensor's value.

On an accelerator, reading a value (`.item()`, `bool(tensor)`, a boolean-mask
gather whose size depends on the data) makes the host wait for every queued
kernel. On this CPU nothing waits, but the same reads are visible as aten ops,
so a dispatch mode that raises on them catches any that come back: it would
stall a GPU exactly where it raises here.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainingArguments

from axolotl_balora.core import BALoRAConfig, apply_balora
from axolotl_balora.core.ops.fused import LmHeadFactor
from axolotl_balora.core.ops.regularizers import fused_regularizer_terms
from axolotl_balora.core.ops.schedules import Lambdas
from axolotl_balora.core.training.term_tally import TermTally
from tiny_models import VOCAB, BALoRATrainer, perturb_trainable, prompted_batch, tiny_llama

aten = torch.ops.aten
# Ops whose result the host must read: a value (item / bool / float of a tensor,
# tensor equality) or a data-dependent size (nonzero, masked_select, unique).
VALUE_READS = {
    aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
    aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_consecutive.default,
}


def _reads_values(func, args) -> bool:
    if func in VALUE_READS:
        return True
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        indices = args[1]  # a boolean index is a nonzero() in disguise
        return any(index is not None and index.dtype in (torch.bool, torch.uint8) for index in indices)
    return False


class RaiseOnHostSync(TorchDispatchMode):
    """Raises at the first aten op that reads a tensor's value on the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _reads_values(func, args):
            raise AssertionError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))


def test_the_mode_catches_what_it_must():
    """The guard itself: each way a value reaches the host is caught."""
    tensor = torch.randn(4)
    for read in (lambda: tensor.sum().item(), lambda: bool(tensor.sum() > 0), lambda: tensor[tensor > 0],
                 lambda: torch.nonzero(tensor), lambda: float(tensor.max())):
        with pytest.raises(AssertionError, match="host sync"), RaiseOnHostSync():
            read()


def _hidden(fault: str | None):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(VOCAB, 16, generator=generator) / 4
    hidden = torch.randn(2, 9, 16, generator=generator, requires_grad=True)
    ref_hidden = torch.randn(2, 9, 16, generator=generator)
    labels = torch.randint(0, VOCAB, (2, 9), generator=generator)
    labels[0, :3] = -100
    if fault == "reference":
        ref_hidden[1, 4, 0] = float("nan")
    return hidden, ref_hidden, labels, weight


@pytest.mark.parametrize("fault", [None, "reference", "svd"])
def test_the_fused_loss_its_backward_and_the_tally_never_sync(fault, monkeypatch):
    """Healthy inputs, a NaN reference and a NaN SVD: the skip decisions stay on the device too."""
    if fault == "svd":
        original = torch.linalg.svdvals
        monkeypatch.setattr(torch.linalg, "svdvals", lambda rows: original(rows) * float("nan"))
    hidden, ref_hidden, labels, weight = _hidden(fault)
    config = BALoRAConfig(lambda_schedule="constant", chunk_size=5)
    lambdas = Lambdas(consistency=0.5, diversity=0.3, svd=0.2)
    factor = LmHeadFactor()
    factor(weight)  # computed once per run, outside the step
    tally = TermTally()
    with RaiseOnHostSync():
        fused = fused_regularizer_terms(hidden, ref_hidden, labels, weight, lambda: factor(weight), config, lambdas)
        (2.0 * fused.total).backward()
        tally.add(fused.terms, lambdas)
    assert torch.isfinite(hidden.grad).all()
    expected_skips = {"reference": {"consistency": 1}, "svd": {"svd": 1}}.get(fault, {})
    assert fused.terms.skipped == expected_skips


class _LossOnlySyncGuard:
    """Raise on host syncs inside the trainer's loss, but not inside the model's own forward.

    The model's forward is the user's (transformers' mask building may read
    values); what this project adds around it must not.
    """

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.mode = RaiseOnHostSync()
        self.mode.__enter__()
        mode = self.mode
        self.original_forward = forward = self.model.forward

        def forward_outside_the_guard(*args, **kwargs):
            mode.__exit__(None, None, None)
            try:
                return forward(*args, **kwargs)
            finally:
                mode.__enter__()

        self.model.forward = forward_outside_the_guard
        return self

    def __exit__(self, *exc):
        self.model.forward = self.original_forward
        return self.mode.__exit__(*exc)


def test_a_training_micro_step_adds_no_host_sync(tmp_path):
    """compute_loss + backward of the second step (the first runs the one-time head check)."""
    model = apply_balora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    perturb_trainable(model, seed=4, scale=0.05)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    config = BALoRAConfig(lambda_schedule="constant", chunk_size=7,
                          lambda_consistency=0.5, lambda_diversity=0.3, lambda_svd=0.2)
    trainer = BALoRATrainer(model=model, args=args, balora_config=config)
    model.train()
    trainer.compute_loss(model, prompted_batch()).backward()
    assert trainer.balora_loss_path.startswith("fused")
    with _LossOnlySyncGuard(model):
        loss = trainer.compute_loss(model, prompted_batch())
        loss.backward()
    assert torch.isfinite(loss.detach())
