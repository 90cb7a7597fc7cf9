"""Scoring a tuned model for the quality study: exact task answers, drift and diversity.

Prompts are built with Axolotl's own alpaca prompter, so the model is asked
exactly the way it was trained. Generation is greedy for the scored tasks and
seeded sampling (temperature 1, no top-k / top-p) for diversity.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from axolotl.prompters import AlpacaPrompter
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quality_tasks import LABELS, Record, arithmetic_answer, expected_answer, sentiment_answer

OPEN_PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Describe your ideal weekend.",
    "Give some advice to a new student.",
    "Write a poem about the sea.",
    "Explain why people enjoy music.",
    "Describe a busy market in the morning.",
    "Write a letter to a friend you have not seen in years.",
    "Tell me about an interesting animal.",
)


@dataclass(frozen=True)
class EvalSizes:
    """How much text each measure reads or generates."""

    text_windows: int = 8
    window_tokens: int = 128
    samples_per_prompt: int = 2
    open_prompts: int = len(OPEN_PROMPTS)
    diversity_tokens: int = 40
    batch: int = 16


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The prompt Axolotl's `type: alpaca` builds for a record, up to the response."""
    return next(AlpacaPrompter().build_prompt(instruction, input_text or None))


@torch.no_grad()
def generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
    max_new_tokens: int, batch: int, sample_seed: int | None = None,
) -> tuple[list[str], list[float]]:
    """Completions (left-padded batches) and the mean next-token entropy of each.

    `sample_seed` None means greedy; otherwise tokens are sampled from the raw
    distribution, seeded once so every model sees the same random stream.
    """
    tokenizer.padding_side = "left"
    sampling = {"do_sample": False, "top_k": None, "top_p": None, "temperature": None}
    if sample_seed is not None:
        torch.manual_seed(sample_seed)
        sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    texts, entropies = [], []
    for start in range(0, len(prompts), batch):
        encoded = tokenizer(list(prompts[start : start + batch]), return_tensors="pt", padding=True)
        output = model.generate(
            **encoded, **sampling, max_new_tokens=max_new_tokens, output_logits=True,
            return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output.sequences[:, encoded["input_ids"].shape[1] :]
        texts += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        entropies += _mean_entropies(output.logits, new_tokens, tokenizer.eos_token_id)
    return texts, entropies


def _mean_entropies(step_logits: tuple[torch.Tensor, ...], tokens: torch.Tensor, eos_id: int) -> list[float]:
    """Per sequence, the mean entropy (nats) of its next-token distributions up to and including eos."""
    log_probs = torch.stack(step_logits, dim=1).float().log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # (batch, steps)
    after_eos = (tokens == eos_id).long().cumsum(1) - (tokens == eos_id).long() > 0
    live = (~after_eos).float()
    return ((entropy * live).sum(1) / live.sum(1).clamp(min=1)).tolist()


def arithmetic_accuracy(model, tokenizer, problems: list[Record], sizes: EvalSizes) -> dict[str, float]:
    """Exact-match accuracy of greedy answers to held-out word problems."""
    prompts = [alpaca_prompt(p["instruction"], p["input"]) for p in problems]
    answers, _ = generate(model, tokenizer, prompts, max_new_tokens=24, batch=sizes.batch)
    correct = [arithmetic_answer(a) == expected_answer(p) for a, p in zip(answers, problems)]
    return {"arithmetic_accuracy": sum(correct) / len(correct), "arithmetic_examples": answers[:3]}


def sentiment_scores(model, tokenizer, reviews: list[Record], sizes: EvalSizes) -> dict[str, float]:
    """Accuracy, per-class recall and how often "positive" is answered, on a balanced test."""
    prompts = [alpaca_prompt(r["instruction"], r["input"]) for r in reviews]
    answers, _ = generate(model, tokenizer, prompts, max_new_tokens=4, batch=sizes.batch)
    predicted = [sentiment_answer(a) for a in answers]
    truth = [r["output"] for r in reviews]
    scores = {"sentiment_accuracy": _mean([p == t for p, t in zip(predicted, truth)])}
    for label in LABELS:
        scores[f"recall_{label}"] = _mean([p == t for p, t in zip(predicted, truth) if t == label])
    scores["answered_positive"] = _mean([p == "positive" for p in predicted])
    return scores


def tuned_and_base_log_probs(model, inputs: dict, positions: int | slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities at `positions`, with the adapter and without it.

    The base is the same model with its adapter disabled (a LoRA adds nothing then), so no
    second copy is loaded; for the base model itself both are its own (KL 0)."""
    def log_probs() -> torch.Tensor:
        return model(**inputs).logits[:, positions].float().log_softmax(-1)

    tuned = log_probs()
    with model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext():
        return tuned, log_probs()


MINORITY_LABEL = "negative"  # the rare class of every skewed sentiment task (quality_tasks)


def answer_token(tokenizer: PreTrainedTokenizerBase, prompt: str, label: str) -> int:
    """The first token of `label` as it follows `prompt` in training (prompt + output)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + label)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(f"the prompt's tokens change when {label!r} follows it: no single answer position")
    return full_ids[len(prompt_ids)]


@torch.no_grad()
def label_probabilities(model, tokenizer, reviews: list[Record], sizes: EvalSizes) -> dict[str, float]:
    """What the model does to the minority class before it answers: at the answer position of each
    test review, the probability of the minority label's first token, averaged per true class,
    and KL(base || tuned) of that next-token distribution (the base: the adapter disabled; 0 for
    the base model). Greedy recall says only which label wins; this says by how much."""
    prompts = [alpaca_prompt(r["instruction"], r["input"]) for r in reviews]
    minority = answer_token(tokenizer, prompts[0], MINORITY_LABEL)
    tokenizer.padding_side = "left"
    tuned, reference = [], []
    for start in range(0, len(prompts), sizes.batch):
        encoded = tokenizer(prompts[start : start + sizes.batch], return_tensors="pt", padding=True)
        # left padding: each row's positions start at its first real token, as in generate()
        positions = (encoded["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        batch_tuned, batch_base = tuned_and_base_log_probs(model, {**encoded, "position_ids": positions}, -1)
        tuned.append(batch_tuned)
        reference.append(batch_base)
    tuned_log_probs, base_log_probs = torch.cat(tuned), torch.cat(reference)
    p_minority = tuned_log_probs[:, minority].exp().tolist()
    kl = (base_log_probs.exp() * (base_log_probs - tuned_log_probs)).sum(-1)
    truth = [r["output"] for r in reviews]
    scores = {f"p_{MINORITY_LABEL}_on_{label}": _mean([p for p, t in zip(p_minority, truth) if t == label])
              for label in LABELS}
    scores["answer_kl_base_tuned"] = kl.mean().item()
    return scores


@torch.no_grad()
def text_drift(model, tokenizer, text: str, sizes: EvalSizes) -> dict[str, float]:
    """Perplexity of the tuned model and mean token KL(base || tuned) on held-out English.

    The base is the model with its adapter disabled (`tuned_and_base_log_probs`). The
    text is cut into `text_windows` evenly spaced windows of `window_tokens` tokens.
    """
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    length = sizes.window_tokens
    stride = (len(ids) - length) // max(sizes.text_windows - 1, 1)
    windows = torch.stack([ids[i * stride : i * stride + length] for i in range(sizes.text_windows)])
    nll, kl, count = 0.0, 0.0, 0
    for start in range(0, len(windows), sizes.batch):
        chunk = windows[start : start + sizes.batch]
        tuned, reference = tuned_and_base_log_probs(model, {"input_ids": chunk}, slice(None, -1))
        targets = chunk[:, 1:]
        nll -= tuned.gather(-1, targets.unsqueeze(-1)).sum().item()
        kl += (reference.exp() * (reference - tuned)).sum().item()
        count += targets.numel()
    return {"text_perplexity": math.exp(nll / count), "text_kl_base_tuned": kl / count}


def diversity(model, tokenizer, sizes: EvalSizes, sample_seed: int = 1234) -> dict[str, float]:
    """distinct-2 over all sampled continuations of open prompts and their mean token entropy."""
    prompts = [alpaca_prompt(p) for p in OPEN_PROMPTS[: sizes.open_prompts] for _ in range(sizes.samples_per_prompt)]
    texts, entropies = generate(
        model, tokenizer, prompts, sizes.diversity_tokens, sizes.batch, sample_seed=sample_seed
    )
    bigrams = [pair for text in texts for pair in zip(text.split(), text.split()[1:])]
    return {
        "distinct_2": len(set(bigrams)) / max(len(bigrams), 1),
        "generation_entropy": _mean(entropies),
        "diversity_examples": texts[:2],
    }


def _mean(values: Sequence[float | bool]) -> float:
    return sum(values) / len(values) if values else float("nan")
