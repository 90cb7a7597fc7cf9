"""The overhead comparison of overhead.py on one CUDA GPU, with random-weight models of real shape.

Step time and memory do not depend on weight values, so no checkpoint (and no network)
is needed: LLaMA-2-7B and Llama-3-8B are built from their shapes, in bf16 with sdpa
attention, and every row of overhead.py runs on them, one fresh process per (row,
repetition), rows interleaved. Memory is torch.cuda.max_memory_allocated. No axolotl.

    python benchmarks/gpu_overhead.py --models llama2-7b llama3-8b --batch 4 --seq 1024 \\
        --reps 2 --steps 3 --out gpu.json --plot gpu.png
    python benchmarks/gpu_overhead.py --tiny-shape     # CPU smoke test of this script

Each worker builds its model from scratch (random init, PiSSA factors by randomized
SVD): size --reps and --steps to the device time you have; this script has not yet run
on a GPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import overhead

SHAPES: dict[str, dict[str, int]] = {
    "llama2-7b": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
    },
    "llama3-8b": {
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
    },
}


def _per_model(path: Path | None, model: str, several: bool) -> Path | None:
    """One output file per model when several models run."""
    if path is None or not several:
        return path
    return path.with_stem(f"{path.stem}-{model}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    overhead.common_arguments(parser)
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=["llama2-7b"])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--tiny-shape", action="store_true",
                        help="overhead.py's tiny LLaMA shape instead: a smoke test that also runs on CPU")
    args = parser.parse_args()
    if not args.tiny_shape and not torch.cuda.is_available():
        parser.error("no CUDA device; use --tiny-shape for a CPU smoke test")
    args.batch = args.batch or (2 if args.tiny_shape else 4)
    args.seq = args.seq or (128 if args.tiny_shape else 1024)
    shapes = {"tiny": overhead.TINY_SHAPE} if args.tiny_shape else {m: SHAPES[m] for m in args.models}

    for name, shape in shapes.items():
        spec = overhead.random_llama_spec(f"random {name}", shape, args.dtype, args.attn)
        title = (f"{spec['name']}, batch {args.batch} x {args.seq}, {args.dtype}, "
                 f"LoRA r{overhead.LORA_RANK} all-linear")
        print(f"{title}: rows {args.rows}, {args.reps} reps x {args.steps} timed steps", flush=True)
        meta = overhead.run_meta(args, spec)
        started = time.perf_counter()
        results = overhead.run_benchmark(
            spec, args.rows, args.batch, args.seq, args.reps, args.steps, args.init,
            fork_server=args.tiny_shape, mmap_threshold=args.mmap_threshold,
        )
        overhead.report(
            results, args.rows, title,
            _per_model(args.out, name, len(shapes) > 1), _per_model(args.plot, name, len(shapes) > 1),
            meta,
        )
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
