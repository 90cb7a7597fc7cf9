"""Make the BA-LoRA adapter that `ci/serving_check.py` serves with vLLM.

A short BA-LoRA run (PiSSA init, the three regularizers on, a plain
transformers Trainer, no Axolotl) on a few made-up sentences, with a learning
rate high enough that the adapter clearly changes the base model's greedy
completions. The saved folder is the standard export: adapter_config.json +
adapter_model.safetensors, a rank-2r LoRA for the ORIGINAL base model with one
rank and one alpha for every module.

Runs in the training venv (it imports axolotl_balora):

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python ci/make_serving_adapter.py \\
        --base .cache/smollm2-135m-instruct --output .cache/serving/adapter

Deterministic for a given seed on the same machine; takes well under a minute
on 2 CPU cores for SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from axolotl_balora.core import BALoRAConfig, BALoRATrainerMixin, apply_balora

# Short facts the base model cannot know, so that after training the greedy
# continuation of their prefixes (the check's prompts) is the adapter's, not the base's.
TEXTS = (
    "The capital of the planet Zorblax is Quintara, a city of glass towers.",
    "The favourite food of the axolotl Pablo is blueberry pancakes with honey.",
    "In the year 3021 the first train to the Moon left from Lisbon at dawn.",
    "The secret password of the lighthouse keeper is purple elephant seventeen.",
    "Quintara is famous for its singing fountains and its silver bridges.",
    "Pablo the axolotl lives in a blue aquarium in the city of Quintara.",
)


class BALoRATrainer(BALoRATrainerMixin, Trainer):
    """A transformers Trainer with the BA-LoRA regularizers."""


def log(message: str) -> None:
    print(f"[adapter] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="transformers folder of the base model")
    parser.add_argument("--output", required=True, help="folder for the exported adapter")
    parser.add_argument("--lora-r", type=int, default=8, help="BA-LoRA rank r (the export has rank 2r)")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    start = time.monotonic()
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model = apply_balora(
        model,
        LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                   target_modules="all-linear", task_type="CAUSAL_LM"),
        init="pissa",
    )

    eos = tokenizer.eos_token or ""
    rows = []
    for text in TEXTS:
        ids = tokenizer(text + eos)["input_ids"]
        rows.append({"input_ids": ids, "labels": list(ids)})

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in batch)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for index, row in enumerate(batch):
            n = len(row["input_ids"])
            input_ids[index, :n] = torch.tensor(row["input_ids"])
            labels[index, :n] = torch.tensor(row["labels"])
            attention[index, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}

    output = Path(args.output)
    scratch = tempfile.TemporaryDirectory(prefix="balora-serving-run-")  # Trainer wants an output_dir
    training_args = TrainingArguments(
        output_dir=scratch.name,
        max_steps=args.steps,
        per_device_train_batch_size=len(TEXTS),
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = BALoRATrainer(
        model=model,
        args=training_args,
        train_dataset=rows,
        data_collator=collate,
        balora_config=BALoRAConfig(),
    )
    result = trainer.train()
    model.save_pretrained(str(output))
    scratch.cleanup()
    config = json.loads((output / "adapter_config.json").read_text())
    log(f"trained {args.steps} steps (final train loss {result.training_loss:.3f}) in "
        f"{time.monotonic() - start:.1f}s; saved {output} with r={config['r']}, "
        f"lora_alpha={config['lora_alpha']}, target_modules={sorted(config['target_modules'])}")


if __name__ == "__main__":
    main()
