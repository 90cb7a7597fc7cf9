"""The fused, chunked loss against the plain reference functions: values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from transformers import TrainingArguments

from axolotl_balora.core import BALoRAConfig, apply_balora
from axolotl_balora.core.ops.fused import LmHeadFactor, fused_losses, svd_ratio_from_hidden
from axolotl_balora.core.training.loss_path import fused_path_blocker
from axolotl_balora.core.ops.losses import consistency_kl, diversity_entropy, svd_ratio
from tiny_models import perturb_trainable, prompted_batch, VOCAB, BALoRATrainer, tiny_llama

RTOL_F32 = 1e-5
# bf16 hidden states: both paths upcast to float32 before the matmul, so they agree closely;
# the looser bound covers the different summation order of chunked sums.
RTOL_BF16 = 1e-3


def _inputs(batch=3, seq=11, hidden=16, vocab=53, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=generator) / hidden**0.5
    hidden_states = torch.randn(batch, seq, hidden, generator=generator).to(dtype).requires_grad_()
    ref_hidden = torch.randn(batch, seq, hidden, generator=generator).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[0, :4] = -100  # a prompt
    labels[1, 7:] = -100  # right padding
    labels[2, 5] = -100  # a packed-sequence boundary
    return hidden_states, ref_hidden, labels, weight


def _reference(hidden, ref_hidden, labels, weight, temperature, top_k):
    logits = hidden.float() @ weight.T
    ref_logits = ref_hidden.float() @ weight.T
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, weight.shape[0]), labels[:, 1:].reshape(-1),
                         ignore_index=-100)
    return ce, consistency_kl(logits, ref_logits, labels, temperature), diversity_entropy(logits, labels, top_k)


def _fused(hidden, ref_hidden, labels, weight, temperature=2.0, top_k=20, chunk_size=256, lambdas=(0.0, 0.0)):
    return fused_losses(hidden, ref_hidden, labels, weight, temperature, top_k, *lambdas, chunk_size=chunk_size)


def _fused_means(hidden, ref_hidden, labels, weight, temperature, top_k, chunk_size):
    losses = _fused(hidden, ref_hidden, labels, weight, temperature, top_k, chunk_size)
    return losses.cross_entropy, losses.consistency, losses.neg_entropy


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 1000])
@pytest.mark.parametrize(("temperature", "top_k"), [(2.0, 20), (1.0, 0), (3.0, 5)])
def test_fused_matches_reference_values_and_gradients(chunk_size, temperature, top_k):
    hidden, ref_hidden, labels, weight = _inputs()
    fused = _fused_means(hidden, ref_hidden, labels, weight, temperature, top_k, chunk_size)
    reference = _reference(hidden, ref_hidden, labels, weight, temperature, top_k)
    for got, expected in zip(fused, reference):
        torch.testing.assert_close(got, expected, rtol=RTOL_F32, atol=1e-7)
    # One combined gradient: each lambda pair (one term at a time, then all) must give the
    # gradient of CE + lambda_c KL + lambda_d (-H), so each term's own gradient is checked.
    for lambdas in ((0.0, 0.0), (1.3, 0.0), (0.0, 2.1), (1.3, 2.1)):
        objective = _fused(hidden, ref_hidden, labels, weight, temperature, top_k, chunk_size, lambdas).objective
        ce, kl, neg_entropy = reference
        torch.testing.assert_close(objective, ce + lambdas[0] * kl + lambdas[1] * neg_entropy,
                                   rtol=RTOL_F32, atol=1e-7)
        got_grad, = torch.autograd.grad(objective, hidden)
        expected_grad, = torch.autograd.grad(ce + lambdas[0] * kl + lambdas[1] * neg_entropy, hidden,
                                             retain_graph=True)
        torch.testing.assert_close(got_grad, expected_grad, rtol=RTOL_F32, atol=1e-7)


def test_fused_with_bf16_hidden_states():
    hidden, ref_hidden, labels, weight = _inputs(dtype=torch.bfloat16)
    fused = _fused_means(hidden, ref_hidden, labels, weight, 2.0, 20, 4)
    reference = _reference(hidden, ref_hidden, labels, weight, 2.0, 20)
    for got, expected in zip(fused, reference):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=RTOL_BF16, atol=1e-5)
    objective = _fused(hidden, ref_hidden, labels, weight, chunk_size=4, lambdas=(1.0, 1.0)).objective
    got_grad, = torch.autograd.grad(objective, hidden)
    assert got_grad.dtype == torch.bfloat16 and torch.isfinite(got_grad).all()


def test_all_ignored_batch_gives_zero_and_a_graph():
    hidden, ref_hidden, labels, weight = _inputs()
    labels[:] = -100
    losses = _fused(hidden, ref_hidden, labels, weight, lambdas=(1.0, 1.0))
    assert losses.count == 0
    for value in (losses.objective, losses.cross_entropy, losses.consistency, losses.neg_entropy):
        assert value.item() == 0.0
    grad, = torch.autograd.grad(losses.objective, hidden)
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("fault", ["inf", "nan", "overflow"])
def test_a_faulty_reference_drops_the_consistency_exactly(fault):
    """Non-finite reference rows, or rows whose logits could overflow the head's dtype:
    the term is dropped on the device (no host sync), with exactly the gradient of lambda_c = 0."""
    hidden, ref_hidden, labels, weight = _inputs()
    ref_hidden = ref_hidden.clone()
    ref_hidden[0, 6, 2] = {"inf": float("inf"), "nan": float("nan"), "overflow": 3e38}[fault]
    faulty = _fused(hidden, ref_hidden, labels, weight, chunk_size=5, lambdas=(1.3, 2.1))
    without = _fused(hidden, ref_hidden, labels, weight, chunk_size=5, lambdas=(0.0, 2.1))
    assert not faulty.consistency_kept and faulty.diversity_kept
    torch.testing.assert_close(faulty.objective, without.objective, rtol=0, atol=0)
    got, = torch.autograd.grad(faulty.objective, hidden)
    expected, = torch.autograd.grad(without.objective, hidden)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_fault_in_an_ignored_position_changes_nothing():
    hidden, ref_hidden, labels, weight = _inputs()
    clean = _fused(hidden, ref_hidden, labels, weight, lambdas=(1.3, 2.1))
    ref_hidden, hidden_data = ref_hidden.clone(), hidden.detach().clone()
    ref_hidden[0, 1] = float("nan")  # labels[0, 2] is ignored: position 1 is not scored
    hidden_data[1, 8] = float("inf")  # labels[1, 9] is ignored
    faulty_hidden = hidden_data.requires_grad_()
    faulty = _fused(faulty_hidden, ref_hidden, labels, weight, lambdas=(1.3, 2.1))
    assert faulty.consistency_kept and faulty.diversity_kept
    torch.testing.assert_close(faulty.objective, clean.objective, rtol=0, atol=0)
    got, = torch.autograd.grad(faulty.objective, faulty_hidden)
    assert torch.isfinite(got).all() and not got[1, 8].any()


@pytest.mark.parametrize(("k", "norm"), [(3, "frobenius"), (2, "nuclear"), (100, "frobenius")])
def test_svd_term_from_hidden_is_exact(k, norm):
    hidden, _, labels, weight = _inputs()
    got = svd_ratio_from_hidden(hidden, labels, LmHeadFactor()(weight), k, norm)
    expected = svd_ratio(hidden @ weight.T, labels, k, norm)
    torch.testing.assert_close(got, expected, rtol=RTOL_F32, atol=1e-7)
    got_grad, = torch.autograd.grad(got, hidden)
    expected_grad, = torch.autograd.grad(expected, hidden)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_lm_head_factor_is_cached_and_follows_weight_changes():
    weight = torch.randn(40, 8)
    factor = LmHeadFactor()
    first = factor(weight)
    assert factor(weight) is first
    with torch.no_grad():
        weight.mul_(2.0)
    second = factor(weight)
    assert second is not first
    torch.testing.assert_close(second.abs(), 2.0 * first.abs())


def test_a_fixed_lm_head_factor_is_computed_once_for_gathered_copies():
    """A sharded head arrives in new storage at every gather: the fixed factor keeps its first R."""
    weight = torch.randn(40, 8)
    factor = LmHeadFactor(fixed=True)
    first = factor(weight)
    assert factor(weight.clone()) is first
    torch.testing.assert_close(first, LmHeadFactor()(weight))


LAMBDAS = {"consistency": 0.5, "diversity": 0.3, "svd": 0.2}


def _trainer(tmp_path, model, chunk_size, without=(), **args):
    """A trainer with every term on, except those named in `without` (lambda 0)."""
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **args)
    lambdas = {f"lambda_{name}": 0.0 if name in without else value for name, value in LAMBDAS.items()}
    config = BALoRAConfig(lambda_schedule="constant", chunk_size=chunk_size, **lambdas)
    return BALoRATrainer(model=model, args=args, balora_config=config)


def _loss_and_grads(trainer, model):
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, prompted_batch())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _perturbed_model(**lora_kwargs):
    model = apply_balora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  **lora_kwargs))
    perturb_trainable(model, seed=4, scale=0.05)
    return model


def test_trainer_fused_path_matches_plain_path_end_to_end(tmp_path):
    model = _perturbed_model()
    fused = _trainer(tmp_path, model, chunk_size=7)
    plain = _trainer(tmp_path, model, chunk_size=0)
    fused_loss, fused_grads = _loss_and_grads(fused, model)
    plain_loss, plain_grads = _loss_and_grads(plain, model)
    assert fused.balora_loss_path == "fused (chunk 7)"
    assert plain.balora_loss_path == "plain (balora_chunk_size is 0)"
    torch.testing.assert_close(fused_loss, plain_loss, rtol=RTOL_F32, atol=1e-7)
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("lora_kwargs", "reason"),
    [({"modules_to_save": ["lm_head"]}, "modules_to_save"),
     ({"target_modules": ["q_proj", "v_proj", "lm_head"]}, "LoRA on lm_head")],
    ids=["lm_head-trained", "lm_head-adapted"],
)
def test_adapted_or_trained_lm_head_falls_back_to_plain_path(tmp_path, lora_kwargs, reason):
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora_kwargs}
    model = apply_balora(tiny_llama(), LoraConfig(**kwargs))
    assert reason in fused_path_blocker(model)
    trainer = _trainer(tmp_path, model, chunk_size=7)
    loss, _ = _loss_and_grads(trainer, model)
    assert trainer.balora_loss_path.startswith("plain (") and torch.isfinite(loss)


def test_a_head_transform_no_list_knows_is_caught_on_the_first_batch(tmp_path, caplog):
    """Logits scaled after lm_head by something the fast list cannot know (a hook here, as
    Granite's logits_scaling): the check on the real batch sends the loss to the plain path."""
    model = _perturbed_model()
    model.get_base_model().get_output_embeddings().register_forward_hook(lambda _m, _i, output: output / 8)
    assert fused_path_blocker(model) is None
    with caplog.at_level("WARNING", logger="axolotl_balora.core.training"):
        loss, grads = _loss_and_grads(_trainer(tmp_path, model, chunk_size=7), model)
    assert "differ from lm_head(final hidden states)" in caplog.text
    plain_loss, plain_grads = _loss_and_grads(_trainer(tmp_path, model, chunk_size=0), model)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    for name in plain_grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-8)


def test_the_head_check_passes_a_plain_head_and_is_run_once(tmp_path, caplog):
    model = _perturbed_model()
    trainer = _trainer(tmp_path, model, chunk_size=7)
    with caplog.at_level("INFO", logger="axolotl_balora.core.training"):
        for _ in range(2):
            _loss_and_grads(trainer, model)
    assert caplog.text.count("checked against the model's own log-probabilities") == 1
    assert trainer.balora_loss_path == "fused (chunk 7)"


@pytest.mark.parametrize(
    ("attribute", "value", "reason"),
    [("final_logit_softcapping", 30.0, "soft-caps"), ("logits_scaling", 8.0, "logits_scaling = 8.0"),
     ("logit_scale", 0.0625, "logit_scale"), ("lm_head_multiplier", 0.5, "lm_head_multiplier")],
)
@pytest.mark.parametrize("nested", [False, True], ids=["top-level", "text_config"])
def test_known_head_transforms_are_a_shortcut_to_the_plain_path(attribute, value, reason, nested):
    """Multimodal configs (Gemma 3/4) keep these in a nested text_config."""
    model = apply_balora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    config = model.get_base_model().config
    if nested:
        text_config = type(config)(**config.to_dict())
        setattr(text_config, attribute, value)
        config.get_text_config = lambda *args, **kwargs: text_config
    else:
        setattr(config, attribute, value)
    assert reason in fused_path_blocker(model)


def test_failed_svd_is_skipped_counted_and_task_loss_still_trains(tmp_path, monkeypatch):
    import axolotl_balora.core.ops.fused as fused_module

    def failing_svdvals(*args, **kwargs):
        raise torch.linalg.LinAlgError("injected: did not converge")

    monkeypatch.setattr(fused_module.torch.linalg, "svdvals", failing_svdvals)
    model = _perturbed_model()
    trainer = _trainer(tmp_path, model, chunk_size=7)
    loss, grads = _loss_and_grads(trainer, model)
    assert torch.isfinite(loss) and any(g.abs().sum() > 0 for g in grads.values())
    logs = trainer._balora_tally.reduce_and_reset(trainer.accelerator, trainer.args.device)
    assert logs["balora/skipped_svd"] == 1
    assert "balora/svd" not in logs
    assert logs["balora/consistency"] >= 0


# -- a skipped term contributes exactly zero gradient -------------------------

SCORED_ROW, SCORED_POSITION, MASKED_TOKEN = 0, 4, 5  # prompted_batch(): row 0 scores positions 3..9


def _adapters_disabled(model) -> bool:
    return any(getattr(module, "disable_adapters", False) for module in model.modules()
               if hasattr(module, "lora_A"))


def _inf_in_the_reference(model):
    """An overflow in the reference forward only: inf in one scored final hidden state."""

    def hook(_module, _inputs, output):
        if _adapters_disabled(model):
            output = output.clone()
            output[SCORED_ROW, SCORED_POSITION] = float("inf")
            return output

    return model.get_base_model().model.norm.register_forward_hook(hook)


def _masked_token_in_the_logits(model):
    """The model's own logits give one (never targeted) token -inf, as vocabulary masks do."""

    def hook(_module, _inputs, output):
        if not _adapters_disabled(model):
            output = output.clone()
            output[..., MASKED_TOKEN] = float("-inf")
            return output

    return model.get_base_model().get_output_embeddings().register_forward_hook(hook)


def _nan_from_the_svd(model, monkeypatch):
    original = torch.linalg.svdvals
    monkeypatch.setattr(torch.linalg, "svdvals", lambda rows: original(rows) * float("nan"))


@pytest.mark.parametrize("chunk_size", [7, 0], ids=["fused", "plain"])
@pytest.mark.parametrize(
    ("inject", "skipped"),
    [("reference", {"consistency"}), ("logits", {"consistency", "svd"}), ("svd", {"svd"})],
)
def test_a_skipped_term_contributes_exactly_zero_gradient(tmp_path, monkeypatch, chunk_size, inject, skipped):
    """Gradient with the faulty terms skipped == gradient with their lambdas at 0 (same fault)."""
    results = []
    for without in ((), tuple(skipped)):
        model = _perturbed_model()
        batch = prompted_batch()
        assert not (batch["labels"] == MASKED_TOKEN).any()
        if inject == "reference":
            _inf_in_the_reference(model)
        elif inject == "logits":
            _masked_token_in_the_logits(model)
        else:
            _nan_from_the_svd(model, monkeypatch)
        trainer = _trainer(tmp_path, model, chunk_size=chunk_size, without=without)
        results.append((*_loss_and_grads(trainer, model), trainer))
    (loss, grads, trainer), (loss_without, grads_without, _) = results
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, loss_without, rtol=1e-6, atol=1e-7)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, grads_without[name], rtol=1e-5, atol=1e-8)
    logs = trainer._balora_tally.reduce_and_reset(trainer.accelerator, trainer.args.device)
    assert {name for name in LAMBDAS if logs.get(f"balora/skipped_{name}")} == skipped
    if inject == "logits" and chunk_size:  # masked logits are not lm_head(hidden): the check sees it
        assert "differ from lm_head" in trainer.balora_loss_path


def test_training_goes_on_through_an_overflowing_reference(tmp_path):
    model = _perturbed_model()
    _inf_in_the_reference(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = [{key: value[row] for key, value in prompted_batch().items()} for row in range(2)] * 2
    trainer = _trainer(tmp_path, model, chunk_size=7, max_steps=3, per_device_train_batch_size=2,
                       learning_rate=0.1, logging_steps=1, save_strategy="no")
    trainer.train_dataset = data
    history = trainer.train() and trainer.state.log_history
    assert trainer.balora_loss_path.startswith("fused")
    assert [entry["balora/skipped_consistency"] for entry in history if "loss" in entry] == [1, 1, 1]
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.isfinite(param).all(), name
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_half_precision_lm_head_matches_the_models_own_logits():
    """A bf16 lm_head computes bf16 logits; the fused path reproduces exactly that, then float32."""
    hidden, ref_hidden, labels, weight = _inputs(dtype=torch.bfloat16)
    weight = weight.to(torch.bfloat16)
    fused = _fused_means(hidden, ref_hidden, labels, weight, 2.0, 20, 5)
    logits = (hidden @ weight.T).float()
    ref_logits = (ref_hidden @ weight.T).float()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, weight.shape[0]), labels[:, 1:].reshape(-1),
                         ignore_index=-100)
    expected = (ce, consistency_kl(logits, ref_logits, labels), diversity_entropy(logits, labels))
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got, want, rtol=RTOL_F32, atol=1e-6)


def test_a_zero3_partitioned_lm_head_keeps_the_fused_path():
    """ZeRO-3 (ds_id) weights are gathered for the loss (`parallel/output_layer.py`; 2-rank runs in
    tests/fused_vs_plain.py), so partitioning alone is no reason to go plain."""
    model = apply_balora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.get_base_model().get_output_embeddings().weight.ds_id = 7
    assert fused_path_blocker(model) is None


def test_label_smoothing_keeps_the_parents_task_loss(tmp_path):
    """The fused cross-entropy has no label smoothing, so the parent's loss path is used."""
    model = _perturbed_model()
    trainer = _trainer(tmp_path, model, chunk_size=7)
    trainer.args.label_smoothing_factor = 0.1
    _loss_and_grads(trainer, model)
    assert trainer.balora_loss_path.startswith("plain (") and "label smoothing" in trainer.balora_loss_path


def test_a_term_switched_off_has_no_value():
    hidden, _, labels, weight = _inputs()
    losses = _fused(hidden, None, labels, weight, top_k=None)
    assert losses.consistency is None and losses.neg_entropy is None
    assert losses.consistency_kept is None and losses.diversity_kept is None
    torch.testing.assert_close(losses.objective, losses.cross_entropy)
