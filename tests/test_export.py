"""Saved adapters are ordinary PEFT LoRA adapters for the original base (vanilla PEFT reload)."""

from __future__ import annotations

import json
import logging

import pytest
import safetensors.torch
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from axolotl_balora.core.adapter.names import TRAINING_STATE_DIR
from axolotl_balora.core.adapter.pissa_init import apply_balora
from axolotl_balora.core.adapter.serving import vllm_needs
from tiny_models import perturb_trainable, tiny_llama, token_batch
from vanilla_peft import vanilla_peft_logits_of_each

TOLERANCE = 1e-4

EXPORT_CASES = {
    "pissa": ("pissa", {}),
    "pissa-rslora": ("pissa", {"use_rslora": True}),
    "niter-patterns": ("pissa_niter_2", {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}}),
    # A rank key and an alpha key that overlap: rebuilding one dict from the union of
    # both keys would hand layer 0's q_proj another entry's rank or alpha.
    "overlapping-patterns": ("pissa", {"rank_pattern": {"layers.0.self_attn.q_proj": 2},
                                       "alpha_pattern": {"q_proj": 16}}),
    "regex-patterns-rslora": ("pissa", {"rank_pattern": {r"layers\.1\.mlp\.(up|down)_proj": 2},
                                        "alpha_pattern": {r".*\.v_proj": 4}, "use_rslora": True}),
    "gaussian": ("gaussian", {}),
    "modules-to-save": ("pissa", {"modules_to_save": ["lm_head"]}),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """For each case: (folder, logits of the trained model, logits of its export reloaded by vanilla PEFT).

    Every export is reloaded in one vanilla interpreter (one start instead of seven).
    """
    root = tmp_path_factory.mktemp("export")
    tiny_llama().save_pretrained(root / "base")
    tokens = token_batch()
    expected = {}
    for name, (init, lora_kwargs) in EXPORT_CASES.items():
        model = apply_balora(
            tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora_kwargs), init=init
        )
        perturb_trainable(model)
        model.eval()
        with torch.no_grad():
            expected[name] = model(tokens).logits
        model.save_pretrained(root / name)
    reloaded = vanilla_peft_logits_of_each([(root / "base", root / name) for name in EXPORT_CASES], tokens,
                                           root / "reload")
    return {name: (root / name, expected[name], logits) for name, logits in zip(EXPORT_CASES, reloaded)}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_vanilla_peft_reproduces_trained_model(exported, case):
    adapter_dir, expected, reloaded = exported[case]
    assert (reloaded - expected).abs().max() <= TOLERANCE
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True
    assert config["r"] == (4 if EXPORT_CASES[case][0] == "gaussian" else 8)
    if EXPORT_CASES[case][0] != "gaussian":  # one rank and one alpha for every module
        assert config["rank_pattern"] == {} and config["alpha_pattern"] == {} and config["use_rslora"] is False
    assert (adapter_dir / TRAINING_STATE_DIR / "adapter_model.safetensors").exists()


def _pattern_blind_logits(base_dir, adapter_dir, tokens) -> torch.Tensor:
    """A loader as older vLLM, SGLang and TGI read an adapter: `r` and `lora_alpha` from the
    config, nothing else (no rank_pattern, alpha_pattern or use_rslora); W += (alpha / r) B A."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = safetensors.torch.load_file(adapter_dir / "adapter_model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    modules = dict(model.named_modules())
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = weights[key.replace(".lora_A.", ".lora_B.")]
        with torch.no_grad():
            modules[name].weight += config["lora_alpha"] / config["r"] * (b @ a)
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("case", ["pissa-rslora", "niter-patterns", "overlapping-patterns", "regex-patterns-rslora"])
def test_a_loader_that_ignores_patterns_computes_what_peft_computes(exported, case):
    """rsLoRA, per-module ranks and alphas, regex pattern keys: all folded into the one r / alpha."""
    adapter_dir, expected, _ = exported[case]
    got = _pattern_blind_logits(adapter_dir.parent / "base", adapter_dir, token_batch())
    assert (got - expected).abs().max() <= TOLERANCE


def test_per_module_ranks_are_zero_padded_and_scalings_folded_into_b(exported):
    """niter-patterns: q_proj trained at rank 2 (exported 4, padded to 8), v_proj at alpha 3."""
    adapter_dir, _, _ = exported["niter-patterns"]
    weights = safetensors.torch.load_file(adapter_dir / "adapter_model.safetensors")
    q_a = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    q_b = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert q_a.shape[0] == q_b.shape[1] == 8
    assert torch.count_nonzero(q_a[4:]) == 0 and torch.count_nonzero(q_b[:, 4:]) == 0
    assert torch.count_nonzero(q_a[:4]) > 0


def test_the_save_log_names_the_vllm_flags_and_refusals(tmp_path, caplog):
    model = apply_balora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with caplog.at_level(logging.INFO, logger="axolotl_balora"):
        model.save_pretrained(tmp_path / "plain")
    assert "--enable-lora --max-lora-rank 8 --max-loras 1" in caplog.text
    refused = apply_balora(tiny_llama(), LoraConfig(r=300, lora_alpha=8, target_modules=["q_proj"],
                                                    modules_to_save=["lm_head"]))
    with caplog.at_level(logging.INFO, logger="axolotl_balora"):
        refused.save_pretrained(tmp_path / "refused")
    assert "above vLLM's largest LoRA rank, 512" in caplog.text and "modules_to_save (lm_head)" in caplog.text
    assert "axolotl merge-lora" in caplog.text


@pytest.mark.parametrize(("rank", "flag"), [(8, 8), (24, 32), (320, 320), (384, 512)])
def test_max_lora_rank_is_the_smallest_value_vllm_accepts(rank, flag):
    assert vllm_needs(LoraConfig(r=rank)).max_lora_rank == flag


def test_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model = apply_balora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.save_pretrained(tmp_path)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()

    import axolotl_balora.core.adapter.export as export

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(export.safetensors.torch, "save_file", crash)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".balora-save-")]
