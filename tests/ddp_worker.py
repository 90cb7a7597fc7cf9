"""Worker for the 2-process CPU tests (run by torchrun, gloo backend); see test_multiprocess.py.

`init`: every rank builds the adapter after seeding its global RNG differently;
rank 0 writes whether all ranks ended with bit-identical factors.
`train`: a few BA-LoRA steps with the Trainer mixin (DDP when launched with
2 processes); rank 0 saves the adapter.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig
from transformers import TrainingArguments

from axolotl_balora.core import BALoRAConfig, apply_balora
from tiny_models import BALoRATrainer, tiny_llama, token_dataset


def dataset() -> list[dict[str, torch.Tensor]]:
    return token_dataset(rows=4, seq=12, seed=11, prompt_length=lambda row: 1 + row)


def build(init: str):
    rank = int(os.environ.get("RANK", 0))
    torch.manual_seed(1000 + rank)  # different global RNG per rank, on purpose
    base = tiny_llama(seed=0)
    torch.manual_seed(2000 + rank)
    return apply_balora(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), init=init)


def check_init(init: str, out: Path) -> None:
    dist.init_process_group("gloo")
    model = build(init)
    flat = torch.cat([t.detach().flatten() for n, t in sorted(model.state_dict().items()) if "lora_" in n])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if dist.get_rank() == 0:
        identical = all(torch.equal(gathered[0], other) for other in gathered[1:])
        out.write_text(json.dumps({"identical": identical, "world": dist.get_world_size(),
                                   "numel": flat.numel()}))
    dist.destroy_process_group()


def train(out: Path, micro_batch: int, accumulation: int) -> None:
    model = build("pissa")
    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation, max_steps=3, learning_rate=0.05, optim="sgd",
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
    )
    # The SVD term is not a per-token mean, so it depends on how rows pair up in a
    # micro-batch; the comparison uses the two token-decomposable terms.
    config = BALoRAConfig(lambda_consistency=0.5, lambda_diversity=0.5, lambda_svd=0.0,
                          lambda_schedule="constant")
    trainer = BALoRATrainer(model=model, args=args, train_dataset=dataset(), balora_config=config)
    trainer.train()
    if trainer.is_world_process_zero():
        model.save_pretrained(out / "adapter")
    if dist.is_initialized():
        # A rank that exits with the group alive can abort at exit ("terminate called
        # without an active exception" from gloo's threads) while rank 0 still saves.
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["init", "train"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--init", default="pissa")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=1)
    args = parser.parse_args()
    if args.mode == "init":
        check_init(args.init, args.out)
    else:
        train(args.out, args.micro_batch, args.accumulation)


if __name__ == "__main__":
    main()
