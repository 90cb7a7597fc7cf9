"""The balora_* keys through Axolotl's own config validation, and the plugin's hooks."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest
from axolotl.utils.config import prepare_plugins, validate_config
from axolotl.utils.dict import DictDefault

from axolotl_balora import BALoRAPlugin
from axolotl_balora.args import (
    BALORA_KEYS,
    PREFERENCE_RL,
    REFUSED_RL,
    SEQUENCE_SPLITTING_KEYS,
    UNSUPPORTED_WITH_BALORA,
)
from axolotl_balora.core.config import BALoRAConfig
from axolotl_balora.kernels import KERNEL_KEYS
from axolotl_balora.core.training.preference import BALoRAPreferenceMixin
from axolotl_balora.plugin import BALoRATrainer
from axolotl_balora.preference_trainers import axolotl_trainer_class
from axolotl_cli import base_config


@pytest.fixture
def make_config(tmp_path, tiny_dataset):
    def make(**overrides) -> DictDefault:
        raw = base_config(tmp_path / "model", tiny_dataset, tmp_path, **overrides)
        return DictDefault(raw)

    return make


def _validate(cfg: DictDefault) -> DictDefault:
    prepare_plugins(cfg)
    return validate_config(cfg)


def test_defaults_are_the_spec_defaults(make_config):
    validated = _validate(make_config(balora_lambda_schedule=None))
    defaults = BALoRAConfig()
    for key in BALORA_KEYS:
        assert validated[key] == getattr(defaults, key.removeprefix("balora_")), key
    assert (defaults.lambda_consistency, defaults.lambda_diversity, defaults.lambda_svd) == (0.025, 0.005, 0.005)
    assert (defaults.temperature, defaults.diversity_top_k, defaults.svd_top_k) == (2.0, 20, 10)


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("balora_lambda_consistency", -0.1, ">= 0"),
        ("balora_lambda_diversity", -1, ">= 0"),
        ("balora_lambda_svd", -0.005, ">= 0"),
        ("balora_temperature", 0, "> 0"),
        ("balora_temperature", -2.0, "> 0"),
        ("balora_diversity_top_k", -1, ">= 0"),
        ("balora_svd_top_k", -3, ">= 1"),
        ("balora_svd_norm", "spectral", "frobenius, nuclear"),
        ("balora_init", "svd", "pissa_niter_N"),
        ("balora_lambda_schedule", "linear", "paper, constant"),
        ("balora_task", "regression", "auto, causal_lm, classification"),
    ],
)
def test_bad_values_are_refused_naming_key_value_and_allowed(make_config, key, value, allowed):
    with pytest.raises(Exception) as error:
        _validate(make_config(**{key: value}))
    message = str(error.value)
    assert f"{key}: {value!r}" in message
    assert allowed in message


def test_typo_in_a_balora_key_is_refused_with_a_suggestion(make_config):
    with pytest.raises(Exception, match="balora_lamda_svd: unknown BA-LoRA key. Did you mean 'balora_lambda_svd'"):
        _validate(make_config(balora_lamda_svd=0.1))


def test_balora_keys_without_balora_adapter_are_refused(make_config):
    with pytest.raises(Exception, match=r"balora_lambda_svd set while adapter is 'lora'"):
        _validate(make_config(adapter="lora", balora_lambda_schedule=None, balora_lambda_svd=0.1))


def test_lora_config_without_balora_keys_is_untouched(make_config):
    validated = _validate(make_config(adapter="lora", balora_lambda_schedule=None))
    assert all(validated.get(key) is None for key in BALORA_KEYS)


@pytest.mark.parametrize("key", sorted(UNSUPPORTED_WITH_BALORA))
def test_options_axolotl_only_wires_for_lora_are_refused(make_config, key):
    with pytest.raises(Exception, match=f"{key}: True is not supported with adapter: balora"):
        _validate(make_config(**{key: True}))


def _splitting(key: str, degree: int) -> dict:
    """`{key: degree}`, nested for a dotted key (axolotl 0.21's `context_parallel: {size: N}`)."""
    section, _, field = key.partition(".")
    return {section: {field: degree} if field else degree}


@pytest.mark.parametrize("key", SEQUENCE_SPLITTING_KEYS)
def test_sequence_splitting_is_refused_but_degree_one_is_fine(make_config, key):
    """The message names the key the user wrote, also on axolotl 0.21, whose own validator
    copies `sequence_parallel_degree` into `context_parallel_size` and `context_parallel.size`
    before the plugin's runs."""
    with pytest.raises(Exception, match=f"{key}: 2 is not supported with adapter: balora"):
        _validate(make_config(**_splitting(key, 2)))
    assert _validate(make_config(**_splitting(key, 1))).adapter == "balora"


KERNEL_KEYS_UNSET = dict.fromkeys(KERNEL_KEYS)
GPU = {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 1, "compute_capability": "sm_90"}
CPU = {**GPU, "bf16": False, "tf32": False, "compute_capability": None}


def _kernels(cfg: DictDefault, capabilities: dict | None) -> dict:
    prepare_plugins(cfg)
    env = {"torch_version": "2.13.0"} if capabilities is not None else None
    validated = validate_config(cfg, capabilities=capabilities, env_capabilities=env)
    return {key: bool(validated.get(key)) for key in KERNEL_KEYS}


@pytest.mark.parametrize("extra", [{}, {"trust_remote_code": True}, {"rl": "dpo"}], ids=["plain", "remote-code", "rl"])
def test_kernels_are_on_by_default_exactly_where_axolotl_turns_them_on_for_lora(make_config, extra):
    """On a GPU, `adapter: balora` gets the kernels axolotl gives `adapter: lora`, under the same conditions."""
    balora = _kernels(make_config(**KERNEL_KEYS_UNSET, **extra), GPU)
    lora = _kernels(make_config(adapter="lora", balora_lambda_schedule=None, **KERNEL_KEYS_UNSET, **extra), GPU)
    assert balora == lora
    assert all(balora.values()) == (not extra)


def test_on_cpu_the_mlp_kernel_stays_off_and_the_torch_kernels_go_on(make_config):
    """The MLP kernel's Triton activation needs CUDA; the qkv / o kernels are torch code."""
    assert _kernels(make_config(**KERNEL_KEYS_UNSET), CPU) == {
        "lora_mlp_kernel": False, "lora_qkv_kernel": True, "lora_o_kernel": True, "lora_embedding_kernel": True}
    assert not any(_kernels(make_config(**KERNEL_KEYS_UNSET), None).values())  # no capabilities: as for LoRA


def test_kernel_keys_the_user_set_are_kept(make_config):
    chosen = {**KERNEL_KEYS_UNSET, "lora_qkv_kernel": True, "lora_o_kernel": False}
    assert _kernels(make_config(**chosen), GPU) == {
        "lora_mlp_kernel": False, "lora_qkv_kernel": True, "lora_o_kernel": False, "lora_embedding_kernel": False}


ZERO3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}


@pytest.mark.parametrize(("extra", "reason"), [({"lora_dropout": 0.05}, "one dropout mask"),
                                               ({"deepspeed": ZERO3}, "ZeRO-3")], ids=["dropout", "zero3"])
def test_kernels_stay_off_where_balora_cannot_be_exact_and_asking_is_refused(make_config, extra, reason):
    assert not any(_kernels(make_config(**KERNEL_KEYS_UNSET, **extra), GPU).values())
    with pytest.raises(Exception, match=f"lora_qkv_kernel: true is not supported with adapter: balora here: .*{reason}"):
        _kernels(make_config(**{**KERNEL_KEYS_UNSET, "lora_qkv_kernel": True}, **extra), GPU)


def test_plugin_does_nothing_unless_adapter_is_balora(make_config):
    plugin = BALoRAPlugin()
    lora_cfg = make_config(adapter="lora")
    assert plugin.get_trainer_cls(lora_cfg) is None
    assert plugin.load_adapter(model=None, cfg=lora_cfg) is None
    assert plugin.get_trainer_cls(make_config()) is BALoRATrainer
    assert [c.name for c in plugin.get_adapter_capabilities()] == ["balora"]
    assert plugin.get_adapter_capabilities()[0].lora_like


def test_plugin_is_importable_both_ways_and_declared_as_entry_point():
    from axolotl_balora.plugin import BALoRAPlugin as from_module

    assert from_module is BALoRAPlugin
    declared = {ep.name: ep.value for ep in entry_points(group="axolotl.plugins")}
    assert declared.get("balora") == "axolotl_balora:BALoRAPlugin"


@pytest.mark.parametrize(
    ("zero", "refused"),
    [({"stage": 3}, True),
     ({"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}, True),
     ({"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}, False),
     ({"stage": 2}, False)],
    ids=["zero3-unset", "zero3-off", "zero3-on", "zero2"],
)
@pytest.mark.parametrize("inline", [False, True], ids=["file", "inline"])
def test_zero3_without_the_16bit_gather_is_refused(make_config, tmp_path, zero, refused, inline):
    """Without the gather the Trainer saves ZeRO-3 models with an empty state dict."""
    config = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto"}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    cfg = make_config(deepspeed=config if inline else str(path))
    if refused:
        with pytest.raises(ValueError, match="stage3_gather_16bit_weights_on_model_save"):
            _validate(cfg)
    else:
        _validate(cfg)


@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_cpu_ram_efficient_loading_is_refused_only_for_fsdp1(make_config, version):
    """FSDP2's rank-0 loading is handled (tests/test_fsdp2.py); FSDP1's was never run."""
    cfg = make_config(fsdp_version=version, fsdp_config={"cpu_ram_efficient_loading": True,
                                                         "state_dict_type": "FULL_STATE_DICT"})
    if version == 1:
        with pytest.raises(ValueError, match="cpu_ram_efficient_loading: true with adapter: balora is supported "
                                             "with fsdp_version: 2 only"):
            _validate(cfg)
    else:
        _validate(cfg)




def test_kernels_stay_off_for_a_4bit_base_without_cuda_and_asking_is_refused(make_config, tmp_path):
    """The kernels' NF4 dequantize is a CUDA-only bitsandbytes call (the pre-quantized QLoRA route)."""
    base = tmp_path / "base-nf4"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}))
    assert any(_kernels(make_config(**KERNEL_KEYS_UNSET), CPU).values())  # a dense base: the torch kernels go on
    assert not any(_kernels(make_config(**KERNEL_KEYS_UNSET, base_model=str(base)), CPU).values())
    with pytest.raises(Exception, match="lora_qkv_kernel: true is not supported with adapter: balora here: "
                                        "the base is 4-bit and this machine has no CUDA device"):
        _kernels(make_config(**{**KERNEL_KEYS_UNSET, "lora_qkv_kernel": True}, base_model=str(base)), CPU)


@pytest.mark.parametrize("rl", PREFERENCE_RL)
def test_preference_training_validates_and_gets_axolotls_trainer_with_the_terms(make_config, rl):
    cfg = _validate(make_config(rl=rl, remove_unused_columns=False))
    trainer_cls = BALoRAPlugin().get_trainer_cls(cfg)
    assert issubclass(trainer_cls, BALoRAPreferenceMixin)
    assert issubclass(trainer_cls, axolotl_trainer_class(rl))


@pytest.mark.parametrize("rl", sorted(REFUSED_RL))
def test_other_rl_values_are_refused_naming_the_key_and_what_works(make_config, rl):
    with pytest.raises(Exception, match=f"rl: {rl} is not supported with adapter: balora .*"
                                        f"BA-LoRA trains with rl: {', '.join(PREFERENCE_RL)}"):
        _validate(make_config(rl=rl))


def test_every_rl_value_axolotl_knows_is_trained_or_refused():
    from axolotl.utils.schemas.enums import RLType

    assert {rl.value for rl in RLType} <= set(PREFERENCE_RL) | set(REFUSED_RL)


@pytest.fixture
def plugin_registry():
    """Axolotl's plugin manager is one per process: a test that registers a plugin takes it out again."""
    from axolotl.integrations.base import PluginManager

    plugins = PluginManager.get_instance().plugins
    before = dict(plugins)
    yield
    plugins.clear()
    plugins.update(before)


CCE_PLUGIN = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"


def test_another_plugins_schema_default_is_refused_like_the_key_itself(make_config, plugin_registry):
    """The Cut Cross Entropy plugin's schema defaults `cut_cross_entropy` to true when the YAML is silent."""
    plugins = ["axolotl_balora.BALoRAPlugin", CCE_PLUGIN]
    with pytest.raises(Exception, match="cut_cross_entropy: True is not supported with adapter: balora .*"
                                        "a default of a listed plugin's schema: write cut_cross_entropy: false"):
        _validate(make_config(plugins=plugins))
    assert _validate(make_config(plugins=plugins, cut_cross_entropy=False))["cut_cross_entropy"] is False
