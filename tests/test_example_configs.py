"""Every shipped example config passes Axolotl's own validation with the plugin registered."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from axolotl.utils.config import prepare_plugins, validate_config
from axolotl.utils.dict import DictDefault

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "example_configs").glob("*.yml"))


def test_examples_exist():
    assert {path.name for path in EXAMPLES} >= {"quickstart.yml", "llama2-7b-balora.yml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_config_validates(path):
    cfg = DictDefault(yaml.safe_load(path.read_text()))
    prepare_plugins(cfg)
    validated = validate_config(cfg)
    assert validated.adapter == "balora"
    assert "axolotl_balora.BALoRAPlugin" in validated.plugins
    assert validated.balora_init in ("pissa", "pissa_niter_16")
