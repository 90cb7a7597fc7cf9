"""Worker for the FSDP2 CPU test (torchrun, gloo): BA-LoRA on a model sharded with fully_shard.

Every rank also keeps an unsharded copy and checks, on the same input, that the
sharded model gives the pre-trained logits with adapters disabled, equals them at
step 0 with adapters on, and yields the same BA-LoRA loss and gradients.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig
from torch.distributed.fsdp import fully_shard

from axolotl_balora.core import BALoRAConfig, apply_balora
from axolotl_balora.core.training.loss_path import fused_path_blocker
from axolotl_balora.core.ops.regularizers import plain_regularizer_terms
from axolotl_balora.core.ops.schedules import lambdas_at
from tiny_models import tiny_llama, token_batch


def balora_loss(model, tokens, config):
    """Task loss + weighted terms, the trainer's plain path without a Trainer."""
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(tokens).logits
    outputs = model(tokens, labels=tokens)
    lambdas = lambdas_at(config, 0, 1)
    terms = plain_regularizer_terms(outputs.logits, ref_logits, tokens, config, lambdas)
    return outputs.loss + terms.weighted_sum(lambdas), ref_logits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    base = tiny_llama(seed=0)
    with torch.no_grad():
        pretrained = base(token_batch()).logits
    model = apply_balora(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), init="pissa")
    with torch.no_grad():  # move off the init so every term has a gradient
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    unsharded = copy.deepcopy(model)
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    tokens = token_batch()
    config = BALoRAConfig(lambda_schedule="constant", lambda_consistency=0.5, lambda_diversity=0.3,
                          lambda_svd=0.2)
    sharded_loss, sharded_ref = balora_loss(model, tokens, config)
    sharded_loss.backward()
    reference_loss, _ = balora_loss(unsharded, tokens, config)
    reference_loss.backward()
    sharded_grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    grad_difference = max(
        (sharded_grads[n] - p.grad).abs().max().item()
        for n, p in unsharded.named_parameters() if p.requires_grad
    )
    if dist.get_rank() == 0:
        out.write_text(json.dumps({
            "reference_vs_pretrained": (sharded_ref - pretrained).abs().max().item(),
            "loss_difference": abs(sharded_loss.item() - reference_loss.item()),
            "grad_difference": grad_difference,
            "trainable": len(sharded_grads),
            "blocker": fused_path_blocker(model),
        }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
