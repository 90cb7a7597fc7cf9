"""Saved adapters are ordinary PEFT LoRA adapters for the original base (vanilla PEFT reload)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig

from axolotl_balora.core.adapter.names import TRAINING_STATE_DIR
from axolotl_balora.core.adapter.pissa_init import apply_balora
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
    assert (adapter_dir / TRAINING_STATE_DIR / "adapter_model.safetensors").exists()


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
