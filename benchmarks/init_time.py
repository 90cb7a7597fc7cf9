"""Wall time of the BA-LoRA PiSSA init on random weights of real shapes: 1 rank, 2 ranks, cached.

The decomposition cost depends on shapes, not values, so each model is built from
its config with random weights (no checkpoint, no network) and `--layers N` decoder
layers (the whole-model time is projected from the per-layer time). Three rows, in
one run, each a fresh process: one rank; `--ranks` ranks under torchrun (gloo),
which split the layers and share the factors; one rank again with the factor cache
filled by a previous run. Every rank uses one thread (what torchrun gives each
rank; on a cluster each rank has its own device), so the rows compare equal
per-rank resources.

    python benchmarks/init_time.py --model llama2-7b --layers 1 --init pissa_niter_16 --rank 128
    python benchmarks/init_time.py --model llama2-7b --layers 1 --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES: dict[str, dict[str, int]] = {
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama2-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                   "num_attention_heads": 64, "num_key_value_heads": 8},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(name: str, layers: int, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SHAPES[name], "num_hidden_layers": layers, "vocab_size": 256})
    torch.manual_seed(0)  # the same weights in every rank
    with torch.device(device):
        return LlamaForCausalLM(config)


def worker(args: argparse.Namespace) -> None:
    """Time apply_balora in this process (every rank of a torchrun group runs this)."""
    import torch.distributed as dist
    from peft import LoraConfig

    from axolotl_balora.core.adapter.pissa_init import apply_balora

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    model = build_model(args.model, args.layers, args.device)
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS)
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    apply_balora(model, config, init=args.init, init_cache=None if args.cache == "off" else args.cache)
    if dist.is_initialized():
        dist.barrier()
    seconds = time.perf_counter() - start
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({"seconds": seconds}))
    if dist.is_initialized():
        dist.destroy_process_group()


def run_row(args: argparse.Namespace, ranks: int, cache: str, out: Path) -> float:
    script = [str(Path(__file__).resolve()), "--worker", "--model", args.model, "--layers", str(args.layers),
              "--init", args.init, "--rank", str(args.rank), "--device", args.device, "--cache", cache,
              "--out", str(out)]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), *script]
    else:
        command = [sys.executable, *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--layers", type=int, default=1, help="decoder layers to build (7 targets each)")
    parser.add_argument("--init", default="pissa_niter_16")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--ranks", type=int, default=2, help="processes for the split row")
    parser.add_argument("--device", default="cpu", help="where the model lives (cuda: decomposed there)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="off", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    total_layers = SHAPES[args.model]["num_hidden_layers"]
    with tempfile.TemporaryDirectory() as scratch:
        scratch_path = Path(scratch)
        cache = str(scratch_path / "cache")
        single = run_row(args, 1, "off", scratch_path / "single.json")
        split = run_row(args, args.ranks, "off", scratch_path / "split.json")
        run_row(args, 1, cache, scratch_path / "fill.json")  # fills the cache
        cached = run_row(args, 1, cache, scratch_path / "cached.json")
    matrices = args.layers * len(TARGETS)
    print(f"{args.model}, {args.layers} of {total_layers} layers ({matrices} matrices), {args.init}, "
          f"r={args.rank}, device {args.device}, 1 thread per rank")
    print(f"{'row':<22}{'seconds':>9}{'s/layer':>9}{'whole model (proj.)':>21}{'vs 1 rank':>11}")
    for row, seconds in [("1 rank", single), (f"{args.ranks} ranks (split)", split), ("1 rank, cached", cached)]:
        per_layer = seconds / args.layers
        print(f"{row:<22}{seconds:>9.2f}{per_layer:>9.2f}{per_layer * total_layers:>19.0f} s"
              f"{seconds / single:>11.3f}")


if __name__ == "__main__":
    main()
