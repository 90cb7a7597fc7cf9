"""The output layer's full weight for the fused loss when FSDP2 or ZeRO-3 shards it.

The fused loss multiplies hidden states by the whole (frozen) lm_head weight,
which these engines keep as a shard outside the head's own forward. It is
gathered once per micro-batch, after the model's forwards and before the loss:

* FSDP2: `unshard()` of the FSDP module that owns the head's parameter (the root,
  in the usual per-layer wrap). This is the engine's own all-gather, so the weight
  comes in the dtype the forward uses (`MixedPrecisionPolicy.param_dtype`), and
  the root stays unsharded until FSDP's post-backward callback reshards it. That
  matters beyond the head: the loss reads the decoder's output, not the model's
  logits, so the root's pre-backward hook never fires, and with
  `reshard_after_forward` the final norm's weight would be freed storage when
  autograd needs it (`DTensor.full_tensor()` alone crashes in backward).
* ZeRO-3: `deepspeed.zero.GatheredParameters([weight])` around the loss; the
  parameter is partitioned again on exit.

Why per micro-batch and not one cached full copy per rank: a copy costs
vocab x hidden for the whole run (1.05 GB per rank at Llama-3's 128,256 x 4,096 in
bfloat16), the memory these engines are used to save, while a gather costs one
extra all-gather of the head per micro-batch, the same collective the model's own
forward already does for it. R of the head's QR (the SVD term) is what is cached:
the head is frozen, so it is computed once per run (`LmHeadFactor(fixed=True)`).

Both gathers are collectives: every rank must call `full_head_weight` at the
same point, which holds as long as every rank takes the same loss path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .sharding import gathered_zero3, is_dtensor, sharding_engine


def _fsdp_owner(root: nn.Module, head: nn.Module) -> nn.Module | None:
    """The deepest FSDP2 module above (or at) `head`: the one whose parameter group holds its weight."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    name = next((name for name, module in root.named_modules() if module is head), None)
    if name is None:
        return None
    parts = name.split(".") if name else []
    owner = None
    for depth in range(len(parts) + 1):
        module = root.get_submodule(".".join(parts[:depth]))
        if isinstance(module, FSDPModule):
            owner = module
    return owner


def output_layer_of(model: nn.Module) -> nn.Module | None:
    """The output layer (lm_head) of a PEFT model or of a bare transformers model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings()


def sharding_blocker(peft_model: nn.Module) -> str | None:
    """Why the head's sharding keeps the fused path off (None: whole, ZeRO-3 or FSDP2)."""
    head = output_layer_of(peft_model)
    sharding = sharding_engine(head.weight)
    if sharding == "FSDP2" and _fsdp_owner(peft_model, head) is None:
        return "the output layer's weight is a DTensor that no FSDP2 module owns (tensor parallel?)"
    return None


@contextlib.contextmanager
def full_head_weight(peft_model: nn.Module) -> Iterator[torch.Tensor]:
    """The output layer's whole weight (detached) for the duration of the block.

    Call it after the model's forwards of this micro-batch (a forward inside the
    block would reshard or release it again). Collective when the weight is sharded.
    """
    head = output_layer_of(peft_model)
    weight = head.weight
    sharding = sharding_engine(weight)
    if sharding == "ZeRO-3":
        with gathered_zero3([weight]):
            yield weight.detach()
        return
    if sharding == "FSDP2":
        owner = _fsdp_owner(peft_model, head)
        if owner is not None:
            owner.unshard()
        weight = head.weight  # FSDP2 swaps the module's parameter for the unsharded one
        if is_dtensor(weight):  # owned elsewhere (e.g. a tied weight sharded with the embedding)
            weight = weight.full_tensor()
    yield weight.detach()
