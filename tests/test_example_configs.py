"""Every shipped example config passes Axolotl's own validation with the plugin registered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from axolotl.utils.config import prepare_plugins, validate_config
from axolotl.utils.dict import DictDefault

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "example_configs").glob("*.yml"))
PAPER_MODELS = ("llama2-7b", "mistral-7b", "gemma-7b")
SETUPS = ("", "-fsdp2", "-zero2", "-zero3", "-qlora")


def test_every_paper_model_ships_every_setup():
    names = {path.name for path in EXAMPLES}
    expected = {f"{model}-balora{setup}.yml" for model in PAPER_MODELS for setup in SETUPS}
    assert expected | {"quickstart.yml"} == names


@pytest.mark.parametrize("path", [p for p in EXAMPLES if p.name != "quickstart.yml"], ids=lambda p: p.name)
def test_gpu_example_uses_the_paper_setup(path):
    """bf16, flash-attention and packing on; each launcher's own keys point at real files."""
    cfg = yaml.safe_load(path.read_text())
    assert cfg["bf16"] is True and cfg["attn_implementation"] == "flash_attention_2" and cfg["sample_packing"] is True
    assert cfg["lora_r"] == cfg["lora_alpha"] == 128 and cfg["learning_rate"] == 2e-5
    assert "load_in_4bit" not in cfg
    if "deepspeed" in cfg:
        stage = int(path.stem[-1])
        assert json.loads((REPO / cfg["deepspeed"]).read_text())["zero_optimization"]["stage"] == stage
    if path.stem.endswith("-qlora"):
        assert "python -m axolotl_balora.quantize" in path.read_text()
        assert cfg["base_model"].endswith("-nf4")
    if path.stem.endswith("-fsdp2"):
        assert cfg["fsdp_version"] == 2
        assert cfg["fsdp_config"]["transformer_layer_cls_to_wrap"].lower().startswith(path.stem.split("-")[0][:5])


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_config_validates(path, caplog):
    """...without any deprecated key (Axolotl logs those as warnings while validating)."""
    cfg = DictDefault(yaml.safe_load(path.read_text()))
    prepare_plugins(cfg)
    with caplog.at_level("WARNING"):
        validated = validate_config(cfg)
    assert not [record.getMessage() for record in caplog.records if "deprecated" in record.getMessage()]
    assert validated.adapter == "balora"
    assert "axolotl_balora.BALoRAPlugin" in validated.plugins
    assert validated.balora_init in ("pissa", "pissa_niter_16")
