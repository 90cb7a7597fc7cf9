"""Peak memory per rank of the fused vs the plain loss path under FSDP2 and ZeRO-3, through the CLI.

Each row is a real `axolotl train` on 2 CPU ranks (torchrun, gloo) of a vocabulary-heavy
random LLaMA (vocab 128,256 as Llama-3, hidden 64, 2 layers), where the logits, not the
model, dominate memory. `plain` sets `balora_chunk_size: 0` (the terms from full logits,
trained and reference); `fused` keeps the default chunked loss, which gathers the sharded
head once per micro-batch (`axolotl_balora/core/parallel/output_layer.py`). The CPU ranks need the
tests' patch (tests/cpu_distributed: accelerate and axolotl select DeepSpeed / FSDP2 only
for GPUs), as the 2-rank tests do. This module is also the plugin that records, on every
rank, the peak RSS (`ru_maxrss`), the RSS when training starts and each step's seconds.

    python benchmarks/sharded_memory.py --out outputs/benchmarks/sharded-memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RANKS = 2
ENGINES = ("fsdp2", "zero3")
PATHS = {"plain": 0, "fused": 256}  # balora_chunk_size
SHAPE = {"vocab_size": 128256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
         "tie_word_embeddings": False}


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _plugin_classes():
    """The rank-memory plugin, built only inside `axolotl train` (axolotl imported there)."""
    from axolotl.integrations.base import BasePlugin
    from transformers import TrainerCallback

    class RankMemoryCallback(TrainerCallback):
        def __init__(self, output_dir: str) -> None:
            self.output_dir = Path(output_dir)
            self.rank = int(os.environ.get("RANK", "0"))
            self.steps: list[float] = []
            self.started = 0.0
            self.begin: dict[str, float] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = {"rss_at_train_begin_mib": _rss_mib(),
                          "peak_rss_at_train_begin_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(time.perf_counter() - self.started)

        def on_train_end(self, args, state, control, **kwargs):
            self.output_dir.mkdir(parents=True, exist_ok=True)
            result = {**self.begin, "step_times_s": self.steps,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            (self.output_dir / f"rank{self.rank}_memory.json").write_text(json.dumps(result))

    class RankMemoryPlugin(BasePlugin):
        def add_callbacks_pre_trainer(self, cfg, model):
            return [RankMemoryCallback(cfg.output_dir)]

    return RankMemoryPlugin


def __getattr__(name: str):  # `plugins: [sharded_memory.RankMemoryPlugin]`
    if name == "RankMemoryPlugin":
        return _plugin_classes()
    raise AttributeError(name)


def build_model(directory: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(BENCHMARKS))
    from overhead import smollm2_spec

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(directory)
    AutoTokenizer.from_pretrained(smollm2_spec("sdpa")["path"]).save_pretrained(directory)
    return directory


def write_dataset(path: Path, rows: int, seq: int) -> None:
    """Pre-tokenized random ids over the whole vocabulary, every label scored."""
    generator = random.Random(0)
    with path.open("w") as out:
        for _ in range(rows):
            ids = [generator.randrange(SHAPE["vocab_size"]) for _ in range(seq)]
            out.write(json.dumps({"input_ids": ids, "attention_mask": [1] * seq, "labels": ids}) + "\n")


def engine_keys(engine: str, workdir: Path) -> dict[str, Any]:
    if engine == "fsdp2":
        return {"fsdp_version": 2, "fsdp_config": {
            "offload_params": False, "state_dict_type": "FULL_STATE_DICT",
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
            "reshard_after_forward": True}}
    zero3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
             "bf16": {"enabled": False}, "fp16": {"enabled": False},
             "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
             "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}
    path = workdir / "zero3.json"
    path.write_text(json.dumps(zero3))
    return {"deepspeed": str(path)}


def run_row(engine: str, path: str, model: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    from axolotl_cli import run_axolotl_on_cpu_ranks

    with tempfile.TemporaryDirectory(prefix="balora-sharded-bench-") as tmp:
        workdir = Path(tmp)
        config = {
            "base_model": str(model), "plugins": ["axolotl_balora.BALoRAPlugin", "sharded_memory.RankMemoryPlugin"],
            "adapter": "balora", "lora_r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_linear": True,
            "balora_init": "pissa_niter_4", "balora_init_cache": False, "balora_lambda_schedule": "constant",
            "balora_chunk_size": PATHS[path],
            "datasets": [{"path": str(data), "ds_type": "json"}], "dataset_prepared_path": str(workdir / "prepared"),
            "val_set_size": 0, "sequence_len": args.seq, "sample_packing": False,
            "micro_batch_size": args.batch, "gradient_accumulation_steps": 1, "max_steps": args.steps,
            "learning_rate": 1e-5, "optimizer": "adamw_torch", "lr_scheduler": "constant", "seed": 0,
            "output_dir": str(workdir / "out"), "logging_steps": 1, "save_strategy": "no",
            "bf16": False, "fp16": False, "attn_implementation": "sdpa",
            "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False,
            **engine_keys(engine, workdir),
        }
        engine_env = "fsdp" if engine == "fsdp2" else "deepspeed"
        # The helper puts the CPU patch in front of PYTHONPATH; this plugin must be importable too.
        if str(BENCHMARKS) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCHMARKS), os.environ.get("PYTHONPATH")]))
        started = time.perf_counter()
        done = run_axolotl_on_cpu_ranks(config, workdir, engine_env, ranks=RANKS, timeout=1800)
        wall = time.perf_counter() - started
        text = done.stdout + done.stderr
        if done.returncode != 0:
            sys.stderr.write(text[-6000:])
            raise RuntimeError(f"axolotl train failed: {engine} {path} (rc {done.returncode})")
        loss_path = "fused" if "fused chunked loss" in text else "plain" if "plain path" in text else "?"
        ranks = [json.loads((workdir / "out" / f"rank{r}_memory.json").read_text()) for r in range(RANKS)]
    return {"engine": engine, "path": path, "loss_path_logged": loss_path, "wall_s": wall, "ranks": ranks}


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| engine | path | peak RSS MiB, rank 0 / rank 1 | at train begin MiB | added in training MiB "
             "| step s (median) | peak × plain |", "|---|---|---|---|---|---|---|"]
    plain_peak = {r["engine"]: max(k["peak_rss_mib"] for k in r["ranks"]) for r in results if r["path"] == "plain"}
    for r in results:
        peaks = [k["peak_rss_mib"] for k in r["ranks"]]
        begin = [k["peak_rss_at_train_begin_mib"] for k in r["ranks"]]
        added = [p - b for p, b in zip(peaks, begin)]
        steps = statistics.median(s for k in r["ranks"] for s in k["step_times_s"][1:])
        ratio = max(peaks) / plain_peak[r["engine"]] if r["engine"] in plain_peak else float("nan")
        lines.append(f"| {r['engine']} | {r['path']} (logged: {r['loss_path_logged']}) "
                     f"| {peaks[0]:.0f} / {peaks[1]:.0f} | {begin[0]:.0f} / {begin[1]:.0f} "
                     f"| {added[0]:.0f} / {added[1]:.0f} | {steps:.2f} | {ratio:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="micro-batch size per rank")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--out", type=Path, help="write the measurements as JSON")
    args = parser.parse_args()
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="balora-sharded-data-") as tmp:
        model = build_model(Path(tmp) / "model")
        data = Path(tmp) / "data.jsonl"
        write_dataset(data, RANKS * args.batch * args.steps, args.seq)
        for engine in args.engines:
            for path in PATHS:
                result = run_row(engine, path, model, data, args)
                peaks = ", ".join(f"{k['peak_rss_mib']:.0f}" for k in result["ranks"])
                print(f"  {engine} {path:5s} (logged {result['loss_path_logged']}): peak RSS {peaks} MiB, "
                      f"run {result['wall_s']:.0f} s", flush=True)
                results.append(result)
                if args.out is not None:  # after every row: a failed row keeps the others
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    meta = {"date": time.strftime("%Y-%m-%d"), "shape": SHAPE, "ranks": RANKS,
                            **{key: str(value) for key, value in vars(args).items()}}
                    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print("\n" + markdown(results))
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
