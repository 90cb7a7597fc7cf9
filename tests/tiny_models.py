"""In-memory tiny random models, token datasets and a plain Trainer for core tests."""

from __future__ import annotations

from typing import Callable

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Trainer,
)

from axolotl_balora.core import BALoRATrainerMixin

VOCAB = 97


def tiny_llama(seed: int = 0, hidden_size: int = 32) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> PreTrainedModel:
    """GPT-2 stores its projections as Conv1D (fan_in_fan_out), a different weight layout."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


ARCHITECTURES = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS = {"llama": "all-linear", "gpt2": ["c_attn", "c_proj", "c_fc"]}


def token_batch(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=generator)


def prompted_batch() -> dict[str, torch.Tensor]:
    """Two rows of 10 random tokens; the first three labels of row 0 are ignored (a prompt)."""
    generator = torch.Generator().manual_seed(9)
    ids = torch.randint(0, VOCAB, (2, 10), generator=generator)
    labels = ids.clone()
    labels[0, :3] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


class BALoRATrainer(BALoRATrainerMixin, Trainer):
    """The mixin on a plain transformers Trainer, as a user without Axolotl writes it."""


def token_dataset(rows: int, seq: int, seed: int, prompt_length: Callable[[int], int]) -> list[dict]:
    """Random rows whose first `prompt_length(row)` labels are ignored (unequal scored counts)."""
    generator = torch.Generator().manual_seed(seed)
    data = []
    for row in range(rows):
        ids = torch.randint(0, VOCAB, (seq,), generator=generator)
        labels = ids.clone()
        labels[: prompt_length(row)] = -100
        data.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(seq, dtype=torch.long)})
    return data


def perturb_trainable(model: torch.nn.Module, seed: int = 7, scale: float = 0.1) -> None:
    """A stand-in for training: move every trainable tensor by seeded noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))
