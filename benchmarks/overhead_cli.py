"""BA-LoRA's overhead as users see it: each row is a real `axolotl train` run, default allocator.

The YAMLs differ only in their adapter keys (and, for official-style, the benchmark
plugin that supplies that loss). Every row lists `step_timer.StepTimerPlugin`, which
records each optimizer step's time and the training process's peak RSS. Rows:

* `lora`             axolotl's plain LoRA (`adapter: lora`, default init): the baseline;
* `balora`           `adapter: balora` with the default settings (paper schedule, fused loss);
* `balora-terms-off` the same with every lambda 0: PiSSA init + frozen factors only;
* `official-style`   PEFT's PiSSA, a separate reference copy, full-vocabulary softmaxes;
* `lora-kernels`     `lora` with axolotl's fused LoRA kernels that run on CPU (qkv, o): the
                     baseline a LoRA user gets by default (axolotl turns them on for LoRA);
* `balora-kernels`   `balora` with the same kernels (BA-LoRA's default on CPU).

Data: pre-tokenized random tokens, every row exactly `--seq` long and every label scored,
so each step sees the same number of tokens. Repetitions interleave the rows (rotated
order). Nothing sets GLIBC_TUNABLES: the allocator is what a user gets.

    python benchmarks/overhead_cli.py --reps 3 --steps 3 --out outputs/benchmarks/overhead-cli.json
    python benchmarks/overhead_cli.py --tiny --reps 1     # a smoke test on a random tiny LLaMA

On a GPU (benchmarks/gpu_check.py runs this): a random-weight model of a real shape, the
kernels as axolotl sets them for each adapter, bf16, flash-attention 2 and sample packing:

    python benchmarks/overhead_cli.py --shape llama3.2-1b --kernels auto --bf16 --packing \
        --attn flash_attention_2 --rows lora balora --reps 2 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from official_style import peft_init_weights
from overhead import LORA_RANK, REPO, TINY_SHAPE, Stat, run_meta, smollm2_spec
from step_timer import RESULT_FILE

BENCHMARKS = Path(__file__).resolve().parent
ROWS = ("lora", "balora", "balora-terms-off", "official-style", "lora-kernels", "balora-kernels")
BASELINE = "lora"
# Each row's ratios are taken against the row of the same kernel setting.
BASELINE_OF = {"lora-kernels": "lora-kernels", "balora-kernels": "lora-kernels"}
# The fused LoRA kernels that run on CPU (the MLP kernel's activation is Triton, GPU only).
CPU_KERNELS = {"lora_qkv_kernel": True, "lora_o_kernel": True}
DEFAULT_INIT = "pissa_niter_4"
TARGETS = {"step time": 1.40, "peak memory": 1.00}  # BA-LoRA (default settings) / plain LoRA


def row_keys(row: str, init: str) -> dict[str, Any]:
    """The YAML keys that make a row what it is (everything else is shared)."""
    timer = "step_timer.StepTimerPlugin"
    if row.endswith("-kernels"):
        return {**row_keys(row.removesuffix("-kernels"), init), **CPU_KERNELS}
    if row == "lora":
        return {"plugins": [timer], "adapter": "lora"}
    if row == "official-style":
        return {"plugins": ["official_style_plugin.OfficialStylePlugin", timer], "adapter": "lora",
                "peft_init_lora_weights": peft_init_weights(init)}
    keys: dict[str, Any] = {"plugins": ["axolotl_balora.BALoRAPlugin", timer], "adapter": "balora",
                            "balora_init": init, "balora_init_cache": False}
    if row == "balora-terms-off":
        keys.update(balora_lambda_consistency=0.0, balora_lambda_diversity=0.0, balora_lambda_svd=0.0)
    return keys


def write_dataset(path: Path, vocab_size: int, rows: int, seq: int, seed: int) -> None:
    """Pre-tokenized rows (Axolotl uses them as they are): random ids, every label scored."""
    generator = random.Random(seed)
    with path.open("w") as out:
        for _ in range(rows):
            ids = [generator.randrange(vocab_size) for _ in range(seq)]
            out.write(json.dumps({"input_ids": ids, "attention_mask": [1] * seq, "labels": ids}) + "\n")


def config_for(row: str, model_path: str, data: Path, workdir: Path, args: argparse.Namespace) -> dict:
    """One row's full YAML: a plain Axolotl LoRA config plus the row's adapter keys.

    `--kernels auto` leaves every kernel key out on a GPU: each adapter gets what axolotl (and
    the plugin, for BA-LoRA) turns on by default. Without CUDA it sets the kernels that run on
    CPU (qkv, o), which is BA-LoRA's CPU default; LoRA's would include the Triton MLP kernel.
    """
    config = {
        "base_model": model_path,
        "lora_r": LORA_RANK, "lora_alpha": LORA_RANK, "lora_dropout": 0.0, "lora_target_linear": True,
        "datasets": [{"path": str(data), "ds_type": "json"}],
        "dataset_prepared_path": str(workdir / "prepared"),
        "val_set_size": 0, "sequence_len": args.seq, "sample_packing": args.packing,
        "micro_batch_size": args.batch, "gradient_accumulation_steps": 1, "max_steps": args.steps + 1,
        "learning_rate": 1e-5, "optimizer": "adamw_torch", "lr_scheduler": "constant", "seed": 0,
        "output_dir": str(workdir / "out"), "logging_steps": 1, "save_strategy": "no",
        "bf16": args.bf16, "fp16": False, "attn_implementation": args.attn,
        "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False,
        **row_keys(row, args.init),
    }
    if args.kernels == "auto":
        for key in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel"):
            config.pop(key)
        if not torch.cuda.is_available():  # axolotl would turn on the Triton MLP kernel for LoRA and crash
            config.update(CPU_KERNELS, lora_mlp_kernel=False)
    return config


@dataclass
class Job:
    row: str
    rep: int


def run_job(job: Job, model_path: str, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`axolotl train` in a fresh process; its step times and peak memory from the timer plugin."""
    with tempfile.TemporaryDirectory(prefix="balora-cli-bench-") as tmp:
        workdir = Path(tmp)
        config = workdir / "config.yml"
        config.write_text(yaml.safe_dump(config_for(job.row, model_path, data, workdir, args)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCHMARKS),
                                                                         os.environ.get("PYTHONPATH")]))}
        env.pop("GLIBC_TUNABLES", None)
        command = ["axolotl", "train", str(config), *(["--launcher", args.launcher] if args.launcher else [])]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
            raise RuntimeError(f"axolotl train failed for row {job.row} (rc {done.returncode})")
        timer = json.loads((workdir / "out" / RESULT_FILE).read_text())
    return {**asdict(job), **timer, "wall_s": wall}


def step_time(result: dict[str, Any]) -> float:
    """The median of the steps after the first (the first pays one-time set-up)."""
    return statistics.median(result["step_times_s"][1:])


def peak_memory(result: dict[str, Any]) -> float:
    """Peak allocated CUDA memory on a GPU, peak RSS of the training process on CPU (MiB)."""
    return result["cuda_peak_mib"] if result.get("cuda_peak_mib") is not None else result["peak_rss_mib"]


def summarize(results: list[dict[str, Any]], rows: list[str]) -> dict[str, dict[str, Any]]:
    """Per row: step time, peak RSS, peak RSS before training and wall time, with ratios to the
    LoRA row of the same kernel setting (`BASELINE_OF`)."""
    measures = {
        "step_s": step_time,
        "peak_mib": peak_memory,
        "peak_before_training_mib": lambda r: r["peak_rss_at_train_begin_mib"],
        "wall_s": lambda r: r["wall_s"],
    }
    summary = {}
    for row in rows:
        mine = [r for r in results if r["row"] == row]
        summary[row] = {name: asdict(Stat.of([get(r) for r in mine])) for name, get in measures.items()}
    for row, stats in summary.items():
        baseline = summary.get(BASELINE_OF.get(row, BASELINE))
        if baseline is not None:
            stats["ratios"] = {name: stats[name]["median"] / baseline[name]["median"] for name in measures}
    return summary


def markdown(summary: dict[str, dict[str, Any]]) -> str:
    """The table docs/performance.md shows, and the verdict on the issue's two targets."""
    def cell(stats: dict[str, Any], name: str, digits: int) -> str:
        s = stats[name]
        ratio = stats.get("ratios", {}).get(name)
        ratio_text = f" | {ratio:.2f}" if ratio is not None else " | –"
        return f"{s['median']:.{digits}f} ({s['low']:.{digits}f}–{s['high']:.{digits}f}){ratio_text}"

    lines = ["| row | step s, median (min–max) | × its LoRA | peak MiB (RSS; CUDA on a GPU) | × its LoRA "
             "| peak before training MiB | × its LoRA | whole run s | × its LoRA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row, stats in summary.items():
        lines.append(f"| {row} | {cell(stats, 'step_s', 2)} | {cell(stats, 'peak_mib', 0)} "
                     f"| {cell(stats, 'peak_before_training_mib', 0)} | {cell(stats, 'wall_s', 0)} |")
    verdicts = [(row, summary[row]["ratios"]) for row in ("balora", "balora-kernels")
                if "ratios" in summary.get(row, {})]
    if verdicts:
        lines.append("")
    for row, ratios in verdicts:
        baseline = BASELINE_OF.get(row, BASELINE)
        for (name, limit), key in zip(TARGETS.items(), ("step_s", "peak_mib")):
            verdict = "PASS" if ratios[key] <= limit else "MISS"
            lines.append(f"- {row} {name} {ratios[key]:.3f}× {baseline} (target ≤ {limit:.2f}×): {verdict}")
    return "\n".join(lines)


SHAPES: dict[str, dict[str, Any]] = {
    "llama3.2-1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
                    "tie_word_embeddings": True},
}


def word_level_tokenizer(vocab_size: int):
    """A tokenizer of `vocab_size` made-up words: the data is pre-tokenized, and axolotl only
    needs the special tokens (no model hub, no SmolLM2 conversion on a GPU machine)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {token: i for i, token in enumerate(special)}
    vocab.update({f"w{i}": i for i in range(len(special), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def random_model(workdir: Path, shape: dict[str, Any]) -> str:
    """A random-weight LLaMA of `shape` with a made-up tokenizer (for --tiny and --shape)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    model.save_pretrained(workdir)
    word_level_tokenizer(shape["vocab_size"]).save_pretrained(workdir)
    return str(workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="micro-batch size")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (after 1 warm-up step)")
    parser.add_argument("--reps", type=int, default=3, help="runs per row, interleaved")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--init", default=DEFAULT_INIT, help="init of the BA-LoRA and official-style rows")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    parser.add_argument("--kernels", default="off", choices=("off", "auto"),
                        help="off: every kernel key false (the *-kernels rows set qkv / o); "
                             "auto: no kernel keys, each adapter gets its default")
    parser.add_argument("--bf16", action="store_true", help="bf16: true (a GPU run)")
    parser.add_argument("--packing", action="store_true", help="sample_packing: true")
    parser.add_argument("--launcher", default=None, choices=("accelerate", "python"),
                        help="axolotl's --launcher (default: axolotl's own default)")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--tiny", action="store_true", help="a random tiny LLaMA: a smoke test")
    shape.add_argument("--shape", choices=sorted(SHAPES), help="a random-weight LLaMA of this shape (GPU)")
    parser.add_argument("--out", type=Path, help="write all measurements and the summary as JSON")
    args = parser.parse_args()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="balora-cli-data-") as tmp:
        shape = TINY_SHAPE if args.tiny else SHAPES.get(args.shape)
        if shape is None:
            spec = smollm2_spec(args.attn)
            vocab = 49152
        else:
            spec = {"name": "tiny" if args.tiny else args.shape, "config": shape, "attn": args.attn,
                    "path": random_model(Path(tmp) / "model", shape)}
            vocab = shape["vocab_size"]
        model_path = spec["path"]
        data = Path(tmp) / "data.jsonl"
        write_dataset(data, vocab, args.batch * (args.steps + 1), args.seq, seed=0)
        meta = run_meta(args, spec)
        results = []
        for rep in range(args.reps):
            shift = rep % len(args.rows)
            for row in args.rows[shift:] + args.rows[:shift]:
                result = run_job(Job(row, rep), model_path, data, args)
                print(f"  rep {rep + 1}/{args.reps} {row:17s} {step_time(result):6.2f} s/step  "
                      f"peak {peak_memory(result):6.0f} MiB  run {result['wall_s']:5.0f} s", flush=True)
                results.append(result)
    summary = summarize(results, args.rows)
    print("\n" + markdown(summary))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "summary": summary, "measurements": results}, indent=1))
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
