"""PiSSA-style initialization without touching the pre-trained weights.

Each targeted linear layer computes W x + s * (B A dropout(x) - B0 A0 x):
the trainable LoRA adapter ("default") starts at the principal factors
(B0, A0), and a second PEFT LoRA adapter (FROZEN_ADAPTER) carries (A0, -B0)
and stays active alongside it. W itself is never modified, so disabling the
adapters gives the pre-trained model exactly, and the learned delta
s * (B A - B0 A0) is an ordinary rank-2r LoRA. The frozen factors are stored
as buffers, not parameters, so nothing (optimizer, `requires_grad_`, PEFT's
`enable_adapters`) can ever make them trainable, while they still travel in
every state dict and checkpoint.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import ParamWrapper
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .layer import use_fused_update
from .names import FROZEN_ADAPTER, TRAINABLE_ADAPTER
from ..parallel.ranks import world
from ..parallel.sharding import gathered_zero3, is_zero3_partitioned
from .model_kind import is_sequence_classifier
from ..config import parse_init
from .export import install_standard_save
from .pissa_factors import (
    FactorCache,
    balanced_owners,
    communication_device,
    compute_device,
    share_from_owners,
)

LOG = logging.getLogger(__name__)

# Fixed seed for randomized SVD, so every process computes the same factors.
RANDOMIZED_SVD_SEED = 20240808


def principal_factors(
    weight: torch.Tensor, rank: int, scaling: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B0, A0) in float32 with scaling * B0 @ A0 = best rank-r approximation of `weight`.

    `niter=None` uses the exact SVD; otherwise torch.svd_lowrank with `niter`
    power iterations under a fixed seed (the global RNG is left untouched).
    """
    matrix = weight.detach().float()
    kept = min(rank, *matrix.shape)
    if niter is None:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        u, s, vh = u[:, :kept], s[:kept], vh[:kept]
    else:
        devices = [matrix.device] if matrix.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(RANDOMIZED_SVD_SEED)
            u, s, v = torch.svd_lowrank(matrix, q=kept, niter=niter)
        vh = v.T
    root = torch.sqrt(s / scaling)
    b0, a0 = u * root, root[:, None] * vh
    if kept < rank:
        # A weight with fewer singular directions than r (a 1 x hidden gate, say) is
        # reproduced exactly by `kept` of them; the other factor rows start at zero.
        b0 = torch.cat([b0, b0.new_zeros(b0.shape[0], rank - kept)], dim=1)
        a0 = torch.cat([a0, a0.new_zeros(rank - kept, a0.shape[1])], dim=0)
    return b0, a0


def base_weight_for_init(layer: LoraLayer) -> torch.Tensor:
    """The base weight as a dense (out, in) matrix, dequantized for 4-bit bitsandbytes layers.

    A 4-bit weight is recognised by its `quant_state`, never by its dtype: with a
    float `bnb_4bit_quant_storage` (FSDP-QLoRA configs use bfloat16) the packed
    bytes are stored in a float tensor of shape (n/2/itemsize, 1), and reading
    them as a weight (as PEFT's PiSSA does for float dtypes) would decompose
    noise. The quantized tensor itself is only read.
    """
    base = layer.get_base_layer()
    quant_state = getattr(base.weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnb_functional  # only reachable with a bnb 4-bit base

        return bnb_functional.dequantize_4bit(base.weight.data, quant_state)
    if isinstance(base, Conv1D):
        return base.weight.T
    if isinstance(base, nn.Linear) and not type(base).__module__.startswith("bitsandbytes"):
        return base.weight
    raise NotImplementedError(
        f"BA-LoRA PiSSA init supports nn.Linear, Conv1D and bitsandbytes 4-bit targets; got "
        f"{type(base).__name__}. Remove this module from lora_target_modules or use balora_init: gaussian."
    )


def _as_buffer(linear: nn.Linear, value: torch.Tensor) -> None:
    """Replace the Linear's weight parameter by a buffer holding `value` (never trainable)."""
    del linear.weight
    linear.register_buffer("weight", value)


def restore_frozen_factor_buffers(model: nn.Module) -> int:
    """Turn frozen factors that a loader re-created as parameters back into buffers; how many.

    FSDP2's rank-0 loading (axolotl's and accelerate's `cpu_ram_efficient_loading`) broadcasts
    the full state dict after sharding and assigns every entry, buffers included, as an
    `nn.Parameter` that requires grad. As parameters the frozen factors would get gradients, and
    gradient clipping fails on them (plain tensors among the sharded DTensors). The values are
    rank 0's, so they still cancel the trainable factors exactly.
    """
    restored = 0
    for _, layer in lora_layers(model):
        for pair in (layer.lora_A, layer.lora_B):
            frozen = pair[FROZEN_ADAPTER] if FROZEN_ADAPTER in pair else None
            if frozen is not None and isinstance(frozen.weight, nn.Parameter):
                _as_buffer(frozen, frozen.weight.detach())
                restored += 1
    return restored


def _frozen_follow_trainable_dtype(layer: LoraLayer, args: tuple) -> None:
    """Forward pre-hook: keep the frozen factors in the trainable factors' current dtype.

    Frameworks cast parameters but not buffers (axolotl 0.21 on CPU casts the
    adapter to float16, DeepSpeed's bf16 engine to bfloat16). The trainable
    factors were cast from the very values the frozen ones hold, so rounding the
    frozen buffers the same way keeps the two pairs cancelling bit for bit.
    """
    for pair in (layer.lora_A, layer.lora_B):
        if FROZEN_ADAPTER not in pair or TRAINABLE_ADAPTER not in pair:
            continue
        dtype = pair[TRAINABLE_ADAPTER].weight.dtype
        frozen = pair[FROZEN_ADAPTER]
        if frozen.weight.dtype != dtype:
            frozen.weight = frozen.weight.to(dtype)


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def _layer_factors(layer: LoraLayer, niter: int | None, cache: FactorCache | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B0, A0) of one layer: from the cache, else decomposed on the accelerator (and cached)."""
    weight = base_weight_for_init(layer)
    rank, scaling = layer.r[TRAINABLE_ADAPTER], layer.scaling[TRAINABLE_ADAPTER]
    key = cache.key(weight, rank, scaling, niter) if cache is not None else None
    expected = ((weight.shape[0], rank), (rank, weight.shape[1]))
    if cache is not None and (cached := cache.load(key)) is not None:
        if tuple(tuple(factor.shape) for factor in cached) == expected:
            return cached
        LOG.warning("BA-LoRA init cache: entry %s has other shapes than %s; recomputing", key, expected)
    b0, a0 = principal_factors(weight.to(compute_device(weight)), rank=rank, scaling=scaling, niter=niter)
    if cache is not None:
        cache.store(key, b0, a0)
    return b0, a0


def _install_factors(layer: LoraLayer, b0: torch.Tensor, a0: torch.Tensor) -> None:
    """Trainable adapter := (B0, A0); frozen adapter := (A0, -B0) as buffers, active together."""
    lora_a = layer.lora_A[TRAINABLE_ADAPTER]
    lora_b = layer.lora_B[TRAINABLE_ADAPTER]
    with torch.no_grad():
        lora_a.weight.copy_(a0.to(lora_a.weight.device, lora_a.weight.dtype))
        lora_b.weight.copy_(b0.to(lora_b.weight.device, lora_b.weight.dtype))
    # Copy after the cast so the frozen pair cancels the trainable one bit for bit.
    _as_buffer(layer.lora_A[FROZEN_ADAPTER], lora_a.weight.detach().clone())
    _as_buffer(layer.lora_B[FROZEN_ADAPTER], -lora_b.weight.detach().clone())
    layer.set_adapter([TRAINABLE_ADAPTER, FROZEN_ADAPTER])
    layer.register_forward_pre_hook(_frozen_follow_trainable_dtype)
    use_fused_update(layer)


def _weights_on_main_rank_only(layers: list[LoraLayer]) -> bool:
    """Whether some rank holds its base weights on the meta device (a collective).

    FSDP's rank-0 loading (`cpu_ram_efficient_loading`) reads the checkpoint on rank 0 only and
    broadcasts it after sharding; the other ranks hold meta tensors until then. Rank 0 then
    decomposes every layer and shares the factors: no rank decomposes placeholders.
    """
    rank, _ = world()
    local = any(layer.get_base_layer().weight.is_meta for layer in layers)
    if rank == 0 and local:
        raise RuntimeError(
            "BA-LoRA PiSSA init: rank 0 holds base weights on the meta device, so there is nothing to "
            "decompose. Load the model with real weights on rank 0 (or use balora_init: gaussian)."
        )
    flag = torch.tensor([int(local)], device=communication_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def attach_frozen_factors(model: PeftModel, lora_config: LoraConfig, niter: int | None,
                          cache: FactorCache | None = None) -> None:
    """Set the trainable adapter to (B0, A0) and add the frozen (A0, -B0) adapter.

    Under torch.distributed the ranks split the layers and share the factors
    (`pissa_factors`): by size, or, under ZeRO-3 (where gathering is collective), one
    of every `world size` consecutive layers gathered together; rank 0 alone when the
    other ranks hold no weights yet (FSDP's rank-0 loading).
    """
    frozen_config = replace(
        lora_config, lora_dropout=0.0, init_lora_weights=True, modules_to_save=None
    )
    model.add_adapter(FROZEN_ADAPTER, frozen_config)
    layers = [layer for _, layer in lora_layers(model) if TRAINABLE_ADAPTER in layer.lora_A]
    rank, size = world()
    partitioned = any(is_zero3_partitioned(layer.get_base_layer().weight) for layer in layers)
    main_only = size > 1 and not partitioned and _weights_on_main_rank_only(layers)
    if partitioned:
        # Gathering is collective: all ranks gather `size` consecutive weights at a time and
        # each decomposes one of them, so the extra memory is `size` weights, not the model.
        owners = [index % size for index in range(len(layers))]
        groups = [list(range(start, min(start + size, len(layers)))) for start in range(0, len(layers), size)]
    else:
        costs = [layer.in_features * layer.out_features for layer in layers]
        owners = [0] * len(layers) if main_only else balanced_owners(costs, size)
        groups = [[index] for index in range(len(layers))]
    progress = tqdm(total=owners.count(rank), desc="BA-LoRA PiSSA init", unit="layer", disable=rank != 0)
    factors: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)
    for group in groups:
        # Under ZeRO-3 (axolotl builds the model inside `zero.Init`) each rank holds an empty
        # partition of each weight; the group is gathered together.
        with gathered_zero3([layers[index].get_base_layer().weight for index in group]):
            for index in group:
                if owners[index] == rank:
                    factors[index] = _layer_factors(layers[index], niter, cache)
                    progress.update(1)
    progress.close()
    if size > 1:
        shapes = [(tuple(layer.lora_B[TRAINABLE_ADAPTER].weight.shape),
                   tuple(layer.lora_A[TRAINABLE_ADAPTER].weight.shape)) for layer in layers]
        factors = share_from_owners(factors, shapes, owners)
    for layer, (b0, a0) in zip(layers, factors):
        _install_factors(layer, b0, a0)
    LOG.info(
        "BA-LoRA PiSSA init: rank %d of %d took %d of %d layers%s", rank, size,
        owners.count(rank), len(layers),
        "" if cache is None else f" ({cache.hits} from the cache in {cache.directory})",
    )
    # Adding an adapter re-freezes every non-LoRA tensor, modules_to_save copies included.
    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            module.set_adapter(TRAINABLE_ADAPTER)


def check_frozen_factors_active(model: nn.Module) -> None:
    """Fail loudly if something re-activated only the trainable adapter.

    Without the frozen adapter a PiSSA-initialized layer computes W + s B A,
    a different model from the one being trained; that must never pass silently.
    """
    for name, layer in lora_layers(model):
        if FROZEN_ADAPTER in layer.lora_A and FROZEN_ADAPTER not in layer.active_adapters:
            raise RuntimeError(
                f"BA-LoRA: the frozen initial factors of {name} are not active "
                f"(active: {layer.active_adapters}). Something called set_adapter() "
                f"on the model; re-activate with "
                f"axolotl_balora.core.adapter.pissa_init.activate_balora_adapters(model)."
            )


def activate_balora_adapters(model: nn.Module) -> None:
    """Make the trainable and frozen adapters active together on every BA-LoRA layer."""
    for _, layer in lora_layers(model):
        if FROZEN_ADAPTER in layer.lora_A:
            layer.set_adapter([TRAINABLE_ADAPTER, FROZEN_ADAPTER])


def _refuse_parameter_targets(model: PeftModel) -> None:
    """PiSSA needs a weight matrix per layer; PEFT's ParamWrapper adapts a raw tensor instead.

    PEFT 0.20 maps "all-linear" on transformers-5 MoE models with fused experts
    (Mixtral, Qwen3-MoE, OLMoE, ...) onto `target_parameters` of the expert tensors.
    """
    wrapped = [name for name, layer in lora_layers(model) if isinstance(layer, ParamWrapper)]
    if wrapped:
        raise ValueError(
            f"BA-LoRA: {len(wrapped)} adapted tensors are parameters, not nn.Linear layers "
            f"(e.g. {wrapped[0]}: fused MoE experts, or target_parameters), which the PiSSA init "
            "and the frozen factors cannot handle. Name the linear layers in target_modules "
            "(lora_target_modules in Axolotl, e.g. q_proj, k_proj, v_proj, o_proj) instead of "
            '"all-linear" or target_parameters.'
        )


def apply_balora(model: nn.Module, lora_config: LoraConfig, init: str = "pissa",
                 init_cache: str | os.PathLike | None = None) -> PeftModel:
    """Wrap `model` with a BA-LoRA adapter described by a standard LoraConfig.

    The returned PeftModel, with adapters disabled, is the pre-trained model
    exactly; at step 0 with adapters enabled (and dropout off) it equals it up
    to float rounding. `init_cache` is a folder that keeps the PiSSA factors
    for the next run on the same base (None: no cache).
    """
    method, niter = parse_init(init)
    if lora_config.use_dora:
        raise NotImplementedError("BA-LoRA does not support DoRA (peft_use_dora); turn it off.")
    config = replace(lora_config, init_lora_weights=True)
    if config.task_type is None and is_sequence_classifier(model):
        # PEFT keeps the new classification head trainable (and saves it) only for SEQ_CLS.
        LOG.info("BA-LoRA: %s is a sequence classifier; using task_type SEQ_CLS", type(model).__name__)
        config = replace(config, task_type="SEQ_CLS")
    peft_model = get_peft_model(model, config)
    _refuse_parameter_targets(peft_model)
    if method == "pissa":
        LOG.info("BA-LoRA: computing PiSSA factors (%s) in float32", init)
        cache = FactorCache(init_cache) if init_cache is not None else None
        attach_frozen_factors(peft_model, config, niter, cache)
    peft_model.balora_init_method = init
    install_standard_save(peft_model)
    return peft_model
