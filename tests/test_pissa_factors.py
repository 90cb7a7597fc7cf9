"""The PiSSA factor cache: a hit loads, a changed weight or a broken file recomputes, off writes nothing."""

from __future__ import annotations

import logging

import pytest
import safetensors.torch
import torch
from peft import LoraConfig

import axolotl_balora.core.adapter.pissa_init as init_module
from axolotl_balora.core.config import BALoRAConfig
from axolotl_balora.core.adapter.pissa_init import apply_balora
from axolotl_balora.core.adapter.pissa_factors import balanced_owners
from tiny_models import tiny_llama

CONFIG = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def _frozen(model) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in model.named_buffers() if ".balora_init." in name}


@pytest.fixture
def count_decompositions(monkeypatch):
    calls = []
    original = init_module.principal_factors

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(init_module, "principal_factors", counting)
    return calls


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_second_build_loads_every_layer_from_the_cache(tmp_path, count_decompositions, init):
    first = apply_balora(tiny_llama(), CONFIG, init=init, init_cache=tmp_path)
    layers = len(count_decompositions)
    assert layers == 2 * 3 and len(list(tmp_path.glob("*.safetensors"))) == layers
    second = apply_balora(tiny_llama(), CONFIG, init=init, init_cache=tmp_path)
    assert len(count_decompositions) == layers  # nothing decomposed the second time
    expected, got = _frozen(first), _frozen(second)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_changed_weight_rank_or_method_is_never_served_from_the_cache(tmp_path, count_decompositions):
    def changed():
        model = tiny_llama()
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight[0, 0] += 1e-3  # one value of one layer
        return model

    apply_balora(tiny_llama(), CONFIG, init="pissa", init_cache=tmp_path)
    count_decompositions.clear()
    model = apply_balora(changed(), CONFIG, init="pissa", init_cache=tmp_path)
    assert len(count_decompositions) == 1
    # A new copy: PEFT injects its layers into the model it wraps (PEFT 0.21 refuses a second
    # adapter of the same name on it).
    fresh = apply_balora(changed(), CONFIG, init="pissa")  # no cache at all
    assert all(torch.equal(v, _frozen(fresh)[k]) for k, v in _frozen(model).items())
    count_decompositions.clear()
    apply_balora(tiny_llama(), CONFIG, init="pissa_niter_4", init_cache=tmp_path)
    apply_balora(tiny_llama(), LoraConfig(r=2, lora_alpha=8, target_modules=CONFIG.target_modules),
                 init="pissa", init_cache=tmp_path)
    assert len(count_decompositions) == 2 * 6


def test_unreadable_entry_is_recomputed_and_replaced(tmp_path, count_decompositions, caplog):
    apply_balora(tiny_llama(), CONFIG, init="pissa", init_cache=tmp_path)
    entry = sorted(tmp_path.glob("*.safetensors"))[0]
    entry.write_bytes(entry.read_bytes()[:40])  # a half-written file
    count_decompositions.clear()
    with caplog.at_level(logging.WARNING):
        apply_balora(tiny_llama(), CONFIG, init="pissa", init_cache=tmp_path)
    assert len(count_decompositions) == 1 and "unreadable entry" in caplog.text
    count_decompositions.clear()
    apply_balora(tiny_llama(), CONFIG, init="pissa", init_cache=tmp_path)
    assert not count_decompositions  # the replacement is good


def test_entry_of_other_shapes_is_recomputed(tmp_path, count_decompositions, caplog):
    """An entry written by an older version (unpadded factors) is never broadcast into a layer."""
    apply_balora(tiny_llama(), CONFIG, init="pissa", init_cache=tmp_path)
    entry = sorted(tmp_path.glob("*.safetensors"))[0]
    factors = safetensors.torch.load_file(entry)
    safetensors.torch.save_file({"b0": factors["b0"][:, :1].contiguous(), "a0": factors["a0"][:1].contiguous()}, entry)
    count_decompositions.clear()
    with caplog.at_level(logging.WARNING):
        apply_balora(tiny_llama(), CONFIG, init="pissa", init_cache=tmp_path)
    assert len(count_decompositions) == 1 and "other shapes" in caplog.text


def test_cache_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("BALORA_INIT_CACHE_DIR", str(tmp_path / "default"))
    assert BALoRAConfig(init_cache="off").init_cache_dir() is None
    assert BALoRAConfig(init_cache=False).init_cache_dir() is None  # YAML's bare `off`
    assert BALoRAConfig().init_cache_dir() == str(tmp_path / "default")
    assert BALoRAConfig(init_cache=str(tmp_path / "mine")).init_cache_dir() == str(tmp_path / "mine")
    apply_balora(tiny_llama(), CONFIG, init="pissa", init_cache=BALoRAConfig(init_cache="off").init_cache_dir())
    assert not (tmp_path / "default").exists()
    with pytest.raises(ValueError, match="balora_init_cache"):
        BALoRAConfig(init_cache="  ")


def test_layers_are_split_by_size_not_round_robin():
    # One LLaMA decoder layer: q, k, v, o (4096 x 4096), gate, up (11008 x 4096), down (4096 x 11008).
    costs = [4096 * 4096] * 4 + [11008 * 4096] * 3
    owners = balanced_owners(costs, 2)
    loads = [sum(cost for cost, owner in zip(costs, owners) if owner == rank) for rank in (0, 1)]
    assert max(loads) / sum(costs) < 0.56  # round robin: q, v, gate, down on rank 0 = 0.61
    assert balanced_owners(costs, 2) == owners and balanced_owners(costs, 1) == [0] * 7
