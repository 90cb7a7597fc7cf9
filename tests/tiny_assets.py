"""Build a tiny random LLaMA (with its own small tokenizer) and a local dataset, offline.

Used by the tests that go through the real `axolotl train` CLI: a model
directory and an alpaca-style jsonl that Axolotl loads like any other.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def arithmetic_records(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Short alpaca-format instruction/response pairs (word problems with exact answers)."""
    rng = random.Random(seed)
    names = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay"]
    items = ["apples", "books", "coins", "pens", "stamps"]
    records = []
    for _ in range(count):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        name, item = rng.choice(names), rng.choice(items)
        records.append(
            {
                "instruction": f"{name} has {a} {item} and gets {b} more. How many {item} now?",
                "input": "",
                "output": f"{name} has {a} + {b} = {a + b} {item}. The answer is {a + b}.",
            }
        )
    return records


def preference_records(count: int, seed: int = 0) -> list[dict]:
    """Pairs in the shape axolotl's chat_template DPO and ORPO loaders read: the user turn in
    `messages`, and `chosen` / `rejected` as [user, assistant] threads (the right sum against
    an off-by-one)."""
    records = []
    for record in arithmetic_records(count, seed=seed):
        user = {"role": "user", "content": record["instruction"]}
        right = record["output"]
        total = int(right.rsplit(" ", 1)[-1].rstrip("."))
        wrong = right.replace(str(total), str(total + 1))
        records.append({
            "messages": [user],
            "chosen": [user, {"role": "assistant", "content": right}],
            "rejected": [user, {"role": "assistant", "content": wrong}],
        })
    return records


def kto_records(count: int, seed: int = 0) -> list[dict]:
    """Unpaired completions labelled desirable or not, in axolotl's `chatml.intel` KTO shape."""
    records = []
    for index, pair in enumerate(preference_records(count, seed=seed)):
        side = "chosen" if index % 2 == 0 else "rejected"
        records.append({"question": pair["messages"][0]["content"],
                        "completion": pair[side][-1]["content"], "label": side == "chosen"})
    return records


def write_jsonl(records: list[dict[str, str]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS)
    tokenizer.train_from_iterator(texts, trainer)
    from tokenizers import decoders

    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def _tiny_tokenizer(seed: int):
    records = arithmetic_records(200, seed=seed)
    texts = [" ".join(r.values()) for r in records] + [
        "Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request. ### Instruction: ### Response:"
    ]
    return build_tokenizer(texts)


def _save_tiny(directory: Path, seed: int, make_model) -> Path:
    """Build `make_model(tokenizer)` seeded and save it with its tokenizer as a model folder."""
    import torch

    tokenizer = _tiny_tokenizer(seed)
    torch.manual_seed(seed)
    model = make_model(tokenizer)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def _token_ids(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """A 2-layer random LlamaForCausalLM + BPE tokenizer saved as a normal model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _save_tiny(directory, seed, lambda tokenizer: LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        **_token_ids(tokenizer))))


def build_tiny_qwen2_moe(directory: Path, seed: int = 0) -> Path:
    """A 2-layer random Qwen2-MoE (4 routed experts, top-2, a shared expert), same tokenizer."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return _save_tiny(directory, seed, lambda tokenizer: Qwen2MoeForCausalLM(Qwen2MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        **_token_ids(tokenizer))))
