"""The fused loss on each causal-LM architecture of transformers 5.16: exact, or a logged step aside.

Why: the fused path never builds logits. It records the decoder's final hidden
states, applies `lm_head.weight` itself and computes the shifted mean
cross-entropy itself, which is the model's own loss only if the model's logits
are lm_head(decoder output) and its loss is that cross-entropy. Architectures
break this in many ways (a biased or non-Linear head, scaled or soft-capped
logits, hidden states transformed before the head, a decoder `get_decoder`
does not find, another label convention in the loss), and no list of such
exceptions stays complete. So each architecture below is built from a tiny
config in memory (hidden 32, 2 layers, vocab 97, dropout 0, PiSSA adapters
moved off their init) and given one training step of the trainer mixin:

* fused path: its task loss equals the model's own `loss` (adapters on, eval
  mode) and its consistency / diversity / SVD terms equal those computed from
  the full logits (`plain_regularizer_terms`), to 1e-5 relative (plus 1e-6
  absolute, for float32 cancellation in terms near zero);
* plain path: expected here (EXPECTED_PLAIN names a substring of the reason)
  and logged by the trainer. The reasons come from the fast list
  (`fused_path_blocker`) or from the head check on the batch, which compares
  log-probabilities and, on a short window, the model's own loss.

Going plain unexpectedly, or fused where plain is expected, fails. A second
group switches the fast list of known reasons off and shows that the head check
on the batch still catches scaled or capped heads, and that for those the fused
cross-entropy really differs from the model's own loss.

LoRA rank is 2 because some tiny layers are 2 wide (Doge's dt_proj, Jamba's
dt_rank); models whose "all-linear" targets fail in PEFT or in apply_balora
get explicit attention targets (see FUSED_EXPERT_MOE).

Left out, and why:
* no `logits_to_keep` in the forward: trocr, xlstm, whisper (WhisperForCausalLM), prophetnet;
* multimodal wrappers needing vision / audio towers, pixel inputs or a second
  encoder: got_ocr2, phi4_multimodal, emu3, mllama, llama4, gemma3n (needs timm),
  gemma4_unified, qwen3_5, qwen3_5_moe, qwen4_exp, git, musicgen, musicgen_melody
  (the text-only variants of gemma4, qwen3_5, qwen4_exp, llama4 are in; gemma3 and
  gemma4 multimodal are in with tiny towers);
* no AutoModelForCausalLM mapping for their config: gemma4_assistant, gemma4_unified_assistant;
* no tiny config by kwargs alone: blt (byte-latent local encoders), zamba, zamba2
  (hybrid layer ids and shared blocks), deepseek_v4 (hyper-connections, compressed
  attention), cohere_compass_text (an embedding model; its rope setup fails to build).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel, TrainingArguments

import axolotl_balora.core.training.loss_path as loss_path_module
import axolotl_balora.core.training.loss_paths as loss_paths_module
from axolotl_balora.core import BALoRAConfig, apply_balora
from axolotl_balora.core.ops.fused import LmHeadFactor
from axolotl_balora.core.training.head_check import check_fused_head
from axolotl_balora.core.training.hidden_states import final_hidden_states
from axolotl_balora.core.training.loss_path import fused_path_blocker
from axolotl_balora.core.ops.regularizers import (
    TERM_NAMES,
    FusedLoss,
    RegularizerTerms,
    fused_regularizer_terms,
    plain_regularizer_terms,
)
from axolotl_balora.core.ops.schedules import lambdas_at
from tiny_models import VOCAB, BALoRATrainer, perturb_trainable

TRAINER_LOGGER = "axolotl_balora.core.training"  # the mixin and its loss path
RTOL, ATOL = 1e-5, 1e-6
MIN_CONSISTENCY = 1e-4  # the moved adapter changes the output: the consistency comparison is not 0 == 0
PERTURB_SCALE = 0.3
CONFIG = BALoRAConfig(lambda_consistency=0.5, lambda_diversity=0.3, lambda_svd=0.2,
                      lambda_schedule="constant", chunk_size=7)
LAMBDAS = lambdas_at(CONFIG, 0, 0)

# -- tiny configs --------------------------------------------------------------

TINY: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
SEQ2SEQ_DECODER = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64)
MLA = dict(num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
           v_head_dim=8)
EXPERTS = dict(n_routed_experts=4, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
               moe_intermediate_size=16, n_shared_experts=1)
MAMBA_MIXER = dict(mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=16)
TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   image_size=28, patch_size=14)

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
MAMBA = ("in_proj", "x_proj", "dt_proj")  # PEFT refuses out_proj / conv1d of Mamba mixers
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    """How to build one architecture tiny, and which layers BA-LoRA adapts."""

    config: Mapping[str, Any] = field(default_factory=dict)  # over TINY; None removes a TINY key
    targets: str | tuple[str, ...] = "all-linear"
    composite: bool = False  # a multimodal wrapper: `config` is complete, TINY is its text_config

    def config_kwargs(self) -> dict[str, Any]:
        merged = dict(self.config) if self.composite else {**TINY, **self.config}
        return {key: value for key, value in merged.items() if value is not None}

    def lora_config(self) -> LoraConfig:
        targets = self.targets if isinstance(self.targets, str) else list(self.targets)
        return LoraConfig(r=2, lora_alpha=4, target_modules=targets)


def gemma_multimodal(model_type: str, **text: Any) -> Arch:
    """Gemma 3 / 4 image-text models with a tiny text model (and, for Gemma 3, a tiny vision tower)."""
    if model_type == "gemma3":
        extra = dict(vision_config=TINY_VISION, mm_tokens_per_image=4, image_token_index=96,
                     boi_token_index=94, eoi_token_index=95)
    else:  # gemma4: no vision or audio tower at all
        text = dict(global_head_dim=8, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB, **text)
        extra = dict(vision_config=None, audio_config=None, image_token_id=96, boi_token_id=94, eoi_token_id=95,
                     video_token_id=93, audio_token_id=92, boa_token_id=91, eoa_token_index=90)
    return Arch({"text_config": {**TINY, **text}, **extra}, ATTENTION, composite=True)


# The generic tiny kwargs build these as they are.
GENERIC = (
    "apertus", "arcee", "aria_text", "bert", "bert-generation", "big_bird", "biogpt", "bitnet", "bloom",
    "camembert", "cohere", "cohere2", "cpmant", "ctrl", "cwm", "data2vec-text", "diffllama", "doge", "electra",
    "ernie", "ernie4_5", "exaone4", "fuyu", "gemma", "gemma2", "gemma3_text", "gemma4_text",
    "gemma4_unified_text", "glm", "glm4", "gpt-sw3", "gpt2", "gpt_bigcode", "gpt_neox", "gpt_neox_japanese",
    "gpt_oss", "granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "helium", "hrm_text",
    "hunyuan_v1_dense", "hy_v3", "hyperclovax", "jais2", "jetmoe", "laguna", "lfm2", "llama", "megatron-bert",
    "mimo_v2_flash", "minimax_m3_vl_text", "ministral", "ministral3", "mistral", "modernbert-decoder", "moshi",
    "mpt", "nanochat", "nemotron", "olmo", "olmo2", "olmo3", "olmo_hybrid", "openai-gpt", "opt", "persimmon",
    "phi", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_5_moe_text", "qwen3_5_text", "qwen4_exp_text",
    "recurrent_gemma", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "rwkv", "seed_oss",
    "smollm3", "stablelm", "starcoder2", "vaultgemma", "xglm", "xlm", "xlm-roberta", "xlm-roberta-xl", "zaya",
)
# The decoders of encoder-decoder families, registered as causal LMs.
SEQ2SEQ_DECODERS = ("bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp",
                    "pegasus", "plbart")
# transformers 5 fuses their experts into 3-D parameters; PEFT 0.20 turns "all-linear" into
# `target_parameters` on them (ParamWrapper), which apply_balora cannot initialize
# (test_all_linear_on_fused_experts below), so the matrix adapts their attention only.
FUSED_EXPERT_MOE = ("afmoe", "cohere2_moe", "dots1", "ernie4_5_moe", "exaone_moe", "flex_olmo", "glm4_moe",
                    "hunyuan_v1_moe", "mellum", "minimax", "minimax_m2", "mixtral", "olmoe", "qwen3_moe",
                    "solar_open")

ARCHITECTURES: dict[str, Arch] = {
    **{name: Arch() for name in GENERIC},
    **{name: Arch(SEQ2SEQ_DECODER) for name in SEQ2SEQ_DECODERS},
    **{name: Arch(EXPERTS, ATTENTION) for name in FUSED_EXPERT_MOE},
    "qwen3_next": Arch({**EXPERTS, "layer_types": ["linear_attention", "full_attention"], "linear_num_key_heads": 2,
                        "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
                        "shared_expert_intermediate_size": 16}, ATTENTION),
    "deepseek_v2": Arch({**MLA, **EXPERTS}, ATTENTION),
    "glm4_moe_lite": Arch({**MLA, **EXPERTS}, ATTENTION),
    "longcat_flash": Arch({**MLA, "n_routed_experts": 4, "moe_topk": 2, "zero_expert_num": 1,
                           "expert_ffn_hidden_size": 16, "ffn_hidden_size": 64, "num_layers": 1}, ATTENTION),
    **{name: Arch({**MLA, **EXPERTS}) for name in ("deepseek_v3", "deepseek_v32", "glm_moe_dsa", "axk2")},
    "axk1": Arch({**MLA, **EXPERTS, "qk_head_dim": 16, "n_group": 1, "topk_group": 1}),
    "youtu": Arch(MLA),
    "minicpm3": Arch(MLA),
    # Their routers are nn.Linear subclasses returning a tuple, which PEFT's LoRA Linear cannot wrap.
    "llama4_text": Arch(EXPERTS, ATTENTION),
    "phimoe": Arch(EXPERTS, ATTENTION),
    "lfm2_moe": Arch({**EXPERTS, "layer_types": ["conv", "full_attention"], "num_dense_layers": 1}),
    "inkling_text": Arch({**EXPERTS, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 8,
                          "sliding_window_size": 8, "d_rel": 4, "rel_extent": 16}),
    "dbrx": Arch(dict(d_model=32, n_heads=4, n_layers=2,
                      attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                      ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 1})),
    "codegen": Arch({"rotary_dim": 4}),
    "gptj": Arch({"rotary_dim": 4}),
    "falcon": Arch({"head_dim": None}),
    "gpt_neo": Arch({"attention_types": [[["global", "local"], 1]]}),
    "xlnet": Arch({"max_position_embeddings": None, "head_dim": None, "d_inner": 64, "d_head": 8}),
    "xmod": Arch({"default_language": "en_XX"}),
    "reformer": Arch(dict(is_decoder=True, attn_layers=["local", "local"], axial_pos_shape=[2, 5],
                          axial_pos_embds_dim=[16, 16], attention_head_size=8, local_attn_chunk_length=5,
                          feed_forward_size=64)),
    "gemma3n_text": Arch(dict(layer_types=["sliding_attention", "full_attention"], num_kv_shared_layers=0,
                              vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8, laurel_rank=4,
                              intermediate_size=[64, 64], activation_sparsity_pattern=[0.0, 0.0])),
    "gemma3": gemma_multimodal("gemma3"),
    "gemma4": gemma_multimodal("gemma4"),
    "mamba": Arch(targets=MAMBA),
    "falcon_mamba": Arch(targets=MAMBA),
    "mamba2": Arch(dict(num_heads=8, head_dim=8, n_groups=1, state_size=8, time_step_rank=4, chunk_size=16),
                   ("in_proj",)),
    "jamba": Arch(targets=ATTENTION + MAMBA + MLP),
    "bamba": Arch(MAMBA_MIXER, ATTENTION + MLP + ("in_proj",)),
    "granitemoehybrid": Arch(MAMBA_MIXER, ATTENTION + ("input_linear", "output_linear", "in_proj")),
    "falcon_h1": Arch({**MAMBA_MIXER, "mamba_d_ssm": 64}, ATTENTION + MLP + ("in_proj",)),
    "nemotron_h": Arch(dict(layers_block_type=["linear_attention", "full_attention"], mamba_num_heads=8,
                            mamba_head_dim=8, n_groups=1, ssm_state_size=8, chunk_size=16),
                       ATTENTION + ("up_proj", "down_proj", "in_proj")),
}

BIAS = "the output layer has a bias"
SOFTCAP = "soft-caps its final logits"
HEAD_CHECK = "differ from lm_head(final hidden states)"
LOSS_FORM = "its task loss is not the one the fused path computes"
EXPECTED_PLAIN: dict[str, str] = {
    **dict.fromkeys(
        ("bert", "bert-generation", "big_bird", "camembert", "codegen", "ctrl", "data2vec-text", "electra", "ernie",
         "gptj", "megatron-bert", "modernbert-decoder", "phi", "rembert", "roberta", "roberta-prelayernorm",
         "roc_bert", "roformer", "xlm", "xlm-roberta", "xlm-roberta-xl", "xlnet", "xmod"), BIAS),
    **dict.fromkeys(("gemma2", "gemma3n_text", "nanochat", "vaultgemma", "recurrent_gemma"), SOFTCAP),
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), "logit_scale = 0.0625"),
    "minicpm3": "logits_scaling = 0.125",  # hidden_size / dim_model_base (32 / 256)
    # No fast-list entry: the head check sees it (`logits_mup_width_multiplier`).
    "inkling_text": HEAD_CHECK,
    # Same logits, another loss: unshifted labels (the encoder-decoder families' decoders, CPM-Ant).
    **dict.fromkeys((*SEQ2SEQ_DECODERS, "cpmant"), LOSS_FORM),
    # Its get_decoder() is the CausalLM itself (base_model_prefix "language_model", the decoder is
    # `.model`): no decoder output to record.
    "llama4_text": "decoder",
}

# Their own loss depends on the transformers version: Moshi shifted twice in 5.16 (it shifted,
# then called the shifting ForCausalLMLoss), so the fused path must step aside; 5.20 calls
# ForCausalLMLoss on the unshifted logits, so the fused path must be taken and exact.
LOSS_FORM_BY_VERSION = ("moshi",)


def loss_is_the_shifted_cross_entropy(peft_model: PeftModel, batch: Mapping[str, torch.Tensor]) -> bool:
    """Whether the model's own loss is the mean next-token cross-entropy of its own logits."""
    peft_model.eval()
    with torch.no_grad():
        output = peft_model(**batch)
    logits, labels = output.logits[:, :-1].float(), batch["labels"][:, 1:]
    shifted = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return bool(torch.isclose(output.loss.float(), shifted, rtol=RTOL, atol=ATOL))


def without_dropout(config: PreTrainedConfig) -> None:
    """Zero every dropout probability, so the training step and the eval-mode reference agree."""
    for part in (config, config.get_text_config()):
        for key, value in part.to_dict().items():
            if isinstance(value, float) and ("dropout" in key or "pdrop" in key or key.endswith("layerdrop")):
                setattr(part, key, 0.0)


def with_torch_reference_kernels(model_class: type) -> bool:
    """Re-import the model's modeling module with its PyTorch kernels, when FLA's cannot run here.

    transformers binds the gated delta rule of Qwen3-Next, Qwen3.5, Qwen4-exp and OLMo-Hybrid
    (`use_kernel_func_from_hub_with_fallback(..., "fla")`) to flash-linear-attention when that
    package imports, whatever the device: Triton kernels that fail without a GPU ("0 active
    drivers"). axolotl depends on flash-linear-attention; with the 0.19 pins (torch 2.13 CPU)
    `import fla` fails (a ValueError from its kernel setup), so the module holds transformers' own
    PyTorch implementation, which is what these CPU tests check; with the 0.21 pins (CUDA torch
    2.14) it imports. With `fla` hidden for the re-import the module binds the PyTorch one on both.
    True if done.
    """
    module = sys.modules[model_class.__module__]
    if module.__name__ in TORCH_KERNEL_MODULES or torch.cuda.is_available():
        return False
    if importlib.util.find_spec("fla") is None or '"fla")' not in Path(module.__file__).read_text():
        return False
    saved = sys.modules.pop("fla", None)
    sys.modules["fla"] = None  # type: ignore[assignment]  # import fla -> ImportError
    try:
        importlib.reload(module)
    finally:
        del sys.modules["fla"]
        if saved is not None:
            sys.modules["fla"] = saved
    TORCH_KERNEL_MODULES.add(module.__name__)
    return True


TORCH_KERNEL_MODULES: set[str] = set()  # re-imported by with_torch_reference_kernels


def build_model(model_type: str, arch: Arch) -> PreTrainedModel:
    config = AutoConfig.for_model(model_type, **arch.config_kwargs())
    without_dropout(config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    if with_torch_reference_kernels(type(model)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()  # the re-imported class
    return model


def balora_model(model_type: str, arch: Arch) -> PeftModel:
    model = apply_balora(build_model(model_type, arch), arch.lora_config())
    perturb_trainable(model, seed=4, scale=PERTURB_SCALE)
    return model


def token_batch() -> dict[str, torch.Tensor]:
    """Two rows of 10 tokens (none of the special ids 0-2); the first three labels of row 0 ignored."""
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(9))
    labels = ids.clone()
    labels[0, :3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in batch.items() if key != "labels"}


# -- one training step, and the references -------------------------------------------------

@dataclass
class Step:
    loss: torch.Tensor
    path: str  # trainer.balora_loss_path
    warnings: list[str]  # the trainer's logged warnings
    fused: list[FusedLoss]  # what fused_regularizer_terms returned


@pytest.fixture(scope="module")
def training_args(tmp_path_factory: pytest.TempPathFactory) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path_factory.mktemp("arch")), report_to=[], use_cpu=True)


def training_step(peft_model: PeftModel, batch: dict[str, torch.Tensor], args: TrainingArguments,
                  monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Step:
    """One `compute_loss` in training mode, recording the path, its warnings and the fused terms."""
    fused: list[FusedLoss] = []
    original: Callable = loss_paths_module.fused_regularizer_terms

    def recording(*positional: Any, **keywords: Any) -> FusedLoss:
        fused.append(original(*positional, **keywords))
        return fused[-1]

    monkeypatch.setattr(loss_paths_module, "fused_regularizer_terms", recording)
    trainer = BALoRATrainer(model=peft_model, args=args, balora_config=CONFIG)
    peft_model.train()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=TRAINER_LOGGER):
        loss = trainer.compute_loss(peft_model, batch)
    warnings = [record.getMessage() for record in caplog.records if record.name.startswith(TRAINER_LOGGER)]
    return Step(loss.detach(), trainer.balora_loss_path, warnings, fused)


@dataclass
class FullLogits:
    loss: torch.Tensor  # the model's own loss
    terms: RegularizerTerms  # the plain path's terms from the full logits


def full_logit_reference(peft_model: PeftModel, batch: dict[str, torch.Tensor]) -> FullLogits:
    peft_model.eval()
    with torch.no_grad():
        output = peft_model(**batch)
        with peft_model.disable_adapter():
            ref_logits = peft_model(**model_inputs(batch)).logits
    terms = plain_regularizer_terms(output.logits, ref_logits, batch["labels"], CONFIG, LAMBDAS)
    return FullLogits(output.loss, terms)


def fused_cross_entropy(peft_model: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fused path's task loss, computed directly (eval mode), whatever the path choice says."""
    peft_model.eval()
    weight = peft_model.get_base_model().get_output_embeddings().weight
    with torch.no_grad():
        hidden = final_hidden_states(peft_model, peft_model, model_inputs(batch))
        fused = fused_regularizer_terms(hidden, None, batch["labels"], weight, lambda: LmHeadFactor()(weight),
                                        CONFIG, LAMBDAS)
    return fused.task


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


# -- the matrix ------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_fused_loss_is_the_models_own_or_steps_aside_with_a_logged_reason(
        model_type: str, training_args: TrainingArguments, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    peft_model = balora_model(model_type, ARCHITECTURES[model_type])
    batch = token_batch()
    expected_reason = EXPECTED_PLAIN.get(model_type)
    if model_type in LOSS_FORM_BY_VERSION and not loss_is_the_shifted_cross_entropy(peft_model, batch):
        expected_reason = LOSS_FORM
    step = training_step(peft_model, batch, training_args, monkeypatch, caplog)
    assert torch.isfinite(step.loss)
    if expected_reason is not None:
        assert step.path.startswith("plain") and expected_reason in step.path, step.path
        assert any(expected_reason in message for message in step.warnings), step.warnings
        assert not step.fused
        return
    assert step.path.startswith("fused"), step.path
    (fused,) = step.fused
    task, terms = fused.task, fused.terms
    reference = full_logit_reference(peft_model, batch)
    assert reference.terms.values["consistency"] > MIN_CONSISTENCY
    assert_close(task, reference.loss, "fused cross-entropy vs the model's own loss")
    for name in TERM_NAMES:
        assert_close(terms.values[name], reference.terms.values[name], f"fused vs plain {name} term")
    assert_close(step.loss, reference.loss + reference.terms.weighted_sum(LAMBDAS), "training loss")


# -- the head check, without the fast list ------------------------------------------------

SCALED_HEADS: dict[str, Arch] = {
    "granite": Arch({"logits_scaling": 8.0}),
    "cohere": Arch({"logit_scale": 0.25}),
    "falcon_h1": Arch({**ARCHITECTURES["falcon_h1"].config, "lm_head_multiplier": 4.0},
                      ARCHITECTURES["falcon_h1"].targets),
    "minicpm3": Arch({**MLA, "dim_model_base": 8}),  # hidden states divided by 32 / 8 before the head
    # Gemma3ForConditionalGeneration ignores text_config.final_logit_softcapping; Gemma 4 applies it.
    "gemma4": gemma_multimodal("gemma4", final_logit_softcapping=0.1),
}


@pytest.mark.parametrize("model_type", sorted(SCALED_HEADS))
def test_the_head_check_itself_catches_scaled_or_capped_heads(
        model_type: str, training_args: TrainingArguments, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    peft_model = balora_model(model_type, SCALED_HEADS[model_type])
    batch = token_batch()
    assert fused_path_blocker(peft_model) is not None  # the fast list knows them; switch it off
    monkeypatch.setattr(loss_path_module, "fused_path_blocker", lambda _model: None)
    step = training_step(peft_model, batch, training_args, monkeypatch, caplog)
    assert step.path.startswith("plain") and HEAD_CHECK in step.path, step.path
    assert any(HEAD_CHECK in message for message in step.warnings)
    assert not step.fused
    own, fused = full_logit_reference(peft_model, batch).loss, fused_cross_entropy(peft_model, batch)
    assert (fused - own).abs() > 100 * RTOL * own.abs(), (fused.item(), own.item())  # the check is needed


@pytest.mark.parametrize(
    ("model_type", "arch"),
    [("llama", ARCHITECTURES["llama"]),
     # The fast list steps aside for this config (text_config soft-caps), but this model ignores it.
     ("gemma3", gemma_multimodal("gemma3", final_logit_softcapping=0.5))],
    ids=["llama", "gemma3-ignored-softcap"],
)
def test_the_head_check_passes_heads_that_are_lm_head_of_the_decoder_output(model_type: str, arch: Arch) -> None:
    peft_model = balora_model(model_type, arch)
    batch = token_batch()
    check = check_fused_head(peft_model, peft_model, model_inputs(batch), batch["labels"])
    assert check.reason is None and check.error < check.tolerance / 100, check
    assert_close(fused_cross_entropy(peft_model, batch), full_logit_reference(peft_model, batch).loss,
                 "fused cross-entropy vs the model's own loss")


def test_all_linear_on_fused_experts_is_refused_with_the_fix() -> None:
    """PEFT 0.20 maps "all-linear" on transformers-5 MoE models to `target_parameters` on the
    fused expert tensors (ParamWrapper layers, no weight matrix): refused, naming the fix,
    instead of an AttributeError from inside the PiSSA init."""
    arch = Arch(EXPERTS)  # "all-linear"
    with pytest.raises(ValueError, match="Name the linear layers in target_modules"):
        apply_balora(build_model("mixtral", arch), arch.lora_config())


def test_a_rank_above_a_layers_smallest_side_keeps_step0_exact() -> None:
    """r = 8 on a 4-wide projection (and on Qwen2-MoE's 1 x hidden shared-expert gate):
    the missing singular directions start as zero factor rows, nothing is broadcast."""
    model = build_model("qwen2_moe", Arch(EXPERTS))
    peft_model = apply_balora(model, LoraConfig(r=8, lora_alpha=8, target_modules=["shared_expert_gate", "q_proj"]))
    gate = next(module for name, module in peft_model.named_modules() if name.endswith("shared_expert_gate"))
    lora_b = gate.lora_B["default"].weight
    assert lora_b.shape == (1, 8) and torch.count_nonzero(lora_b[:, 1:]) == 0 and lora_b[0, 0] != 0
    inputs = model_inputs(token_batch())
    with torch.no_grad():
        adapted = peft_model(**inputs).logits
        with peft_model.disable_adapter():
            base = peft_model(**inputs).logits
    torch.testing.assert_close(adapted, base, rtol=1e-5, atol=1e-5)


def test_every_expected_plain_architecture_is_in_the_matrix() -> None:
    assert set(EXPECTED_PLAIN) <= set(ARCHITECTURES)
