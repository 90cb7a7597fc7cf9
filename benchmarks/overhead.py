"""Step time and peak memory of BA-LoRA's loss paths against plain LoRA and an official-style loss.

Rows (same model, batch, dtype, attention and LoRA r=16 on every linear layer):

* `lora`           plain PEFT LoRA, default init, the model's own loss (the baseline);
* `pissa`          `apply_balora` (PiSSA factors + frozen initial factors), all lambdas 0;
* `balora-fused`   the BA-LoRA trainer's fused, chunked loss, all three terms active;
* `balora-plain`   the same with `chunk_size=0`: the terms from full logits;
* `official-style` a separate reference model and full-vocabulary softmaxes (official_style.py).

Each (row, repetition) runs in its own process, because peak memory is per process
(CPU: ru_maxrss; CUDA: max_memory_allocated), and repetitions interleave the rows
(rotated order), so load from other jobs on the machine spreads over all rows
instead of biasing one. Results are reported as ratios to the `lora` median.

    python benchmarks/overhead.py --tiny                   # smoke test, < 1 min on 2 CPU cores
    python benchmarks/overhead.py --batch 4 --seq 256 --reps 3 --steps 2 \\
        --out results.json --plot docs/img/overhead.png    # SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from peft import LoraConfig, get_peft_model
from peft import __version__ as peft_version
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments
from transformers import __version__ as transformers_version

from axolotl_balora.core import BALoRAConfig, BALoRATrainerMixin, apply_balora
from official_style import OfficialStyleTrainer, official_style_models

REPO = Path(__file__).resolve().parents[1]
ROWS = ("lora", "pissa", "balora-fused", "balora-plain", "official-style")  # the default set
BASELINE = "lora"
LORA_RANK = 16
# Randomized SVD gives the same adapter layout (hence the same step cost) as the exact SVD,
# which takes about 2 minutes per process for SmolLM2's 210 layers on 2 cores.
DEFAULT_INIT = "pissa_niter_4"
HEAVY_MODULES = ["torch", "transformers", "peft", "axolotl_balora.core"]
# Workers' glibc serves allocations of >= this many bytes by mmap and returns them on free.
# By default glibc raises this threshold up to 32 MiB as large blocks are freed, and then
# keeps freed activations in a fragmented heap: RSS then measured the allocation order
# (about 1 GB apart for rows holding the same tensors on SmolLM2) more than the tensors.
MMAP_THRESHOLD = 1 << 20

Batch = dict[str, torch.Tensor]


# -- models ------------------------------------------------------------------
def smollm2_spec(attn: str) -> dict[str, Any]:
    """The embedded SmolLM2-135M-Instruct (converted once from the PyPI GGUF if missing)."""
    sys.path.insert(0, str(REPO / "ci"))
    from prepare_demo import prepare_model

    path = prepare_model(REPO)
    return {"name": "SmolLM2-135M-Instruct", "path": str(path), "dtype": "float32", "attn": attn}


def random_llama_spec(name: str, shape: dict[str, Any], dtype: str, attn: str) -> dict[str, Any]:
    """A random-weight LLaMA of the given shape: timings and memory do not depend on weight values."""
    return {"name": name, "config": shape, "dtype": dtype, "attn": attn}


TINY_SHAPE = {
    "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
}


def load_model(spec: dict[str, Any], device: str) -> torch.nn.Module:
    """Build the model a spec describes, on `device`, in training mode."""
    dtype = getattr(torch, spec["dtype"])
    if "path" in spec:
        model = AutoModelForCausalLM.from_pretrained(
            spec["path"], dtype=dtype, attn_implementation=spec["attn"]
        ).to(device)
        # from_pretrained may leave the weights in a lazily read mmap of the file: copy them into
        # process memory, so RSS counts them from the start and once (PEFT's PiSSA replaces W
        # with new tensors, and stale file pages would count against that row only).
        with torch.no_grad():
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                tensor.data = tensor.data.clone()
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(
                LlamaConfig(**spec["config"]), dtype=dtype, attn_implementation=spec["attn"]
            )
    return model.train()


def random_batch(vocab_size: int, batch: int, seq: int, seed: int, device: str) -> Batch:
    """Random tokens with every next-token label scored (the worst case for vocab-sized tensors)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": input_ids.clone().to(device),
    }


# -- rows --------------------------------------------------------------------
class BALoRATrainer(BALoRATrainerMixin, Trainer):
    """The mixin on a plain transformers Trainer, as a user would write it."""


@dataclass
class BuiltRow:
    """A model ready to train, its loss on a batch, and a check that the intended path ran."""

    model: torch.nn.Module
    loss: Callable[[Batch], torch.Tensor]
    loss_path: Callable[[], str]


def lora_config() -> LoraConfig:
    return LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0, target_modules="all-linear")


def _trainer_row(
    trainer_cls: type, model: torch.nn.Module, output_dir: str, loss_path: Callable[[Any], str],
    **trainer_kwargs: Any,
) -> BuiltRow:
    """Every row's loss is a Trainer's compute_loss, called directly (no Trainer.train loop).

    A Trainer for the baselines too: the rows then share its imports and
    set-up, so memory differences are the loss paths' own.
    """
    device = next(model.parameters()).device
    args = TrainingArguments(output_dir=output_dir, use_cpu=device.type == "cpu", report_to=[])
    trainer = trainer_cls(model=model, args=args, **trainer_kwargs)
    return BuiltRow(model, lambda batch: trainer.compute_loss(model, batch), lambda: loss_path(trainer))


def build_lora(model: torch.nn.Module, init: str, output_dir: str) -> BuiltRow:
    """Plain PEFT LoRA (default init) and the HF Trainer's default loss: model(**batch).loss."""
    return _trainer_row(Trainer, get_peft_model(model, lora_config()), output_dir, lambda _: "model loss")


def _balora_row(model: torch.nn.Module, init: str, output_dir: str, expected: str, **config: Any) -> BuiltRow:
    """apply_balora + BALoRATrainerMixin on a plain Trainer, as a user would write it."""

    def loss_path(trainer: BALoRATrainer) -> str:
        path = trainer.balora_loss_path
        if not path.startswith(expected):
            raise RuntimeError(f"expected the {expected} loss path, the trainer took: {path}")
        return path

    return _trainer_row(
        BALoRATrainer, apply_balora(model, lora_config(), init=init), output_dir, loss_path,
        balora_config=BALoRAConfig(init=init, lambda_schedule="constant", **config),
    )


def build_pissa(model: torch.nn.Module, init: str, output_dir: str) -> BuiltRow:
    """BA-LoRA's adapter layout with every lambda 0: the trainer falls through to the model's loss."""
    return _balora_row(
        model, init, output_dir, "model loss", lambda_consistency=0.0, lambda_diversity=0.0, lambda_svd=0.0
    )


def build_balora_fused(model: torch.nn.Module, init: str, output_dir: str) -> BuiltRow:
    """Default BALoRAConfig (default chunk_size), constant schedule so all three terms are active."""
    return _balora_row(model, init, output_dir, "fused")


def build_balora_plain(model: torch.nn.Module, init: str, output_dir: str) -> BuiltRow:
    """The same with chunk_size=0: the terms from full logits."""
    return _balora_row(model, init, output_dir, "plain", chunk_size=0)


def build_official(model: torch.nn.Module, init: str, output_dir: str) -> BuiltRow:
    """A separate reference model and full-vocabulary softmaxes (see official_style.py)."""
    peft_model, reference = official_style_models(model, lora_config(), init)
    return _trainer_row(
        OfficialStyleTrainer, peft_model, output_dir, lambda _: "official-style", reference=reference
    )


def build_balora_fused_chunk1024(model: torch.nn.Module, init: str, output_dir: str) -> BuiltRow:
    """Diagnostic (not a default row): 1024-token chunks, the default before it became 256."""
    return _balora_row(model, init, output_dir, "fused", chunk_size=1024)


ROW_BUILDERS: dict[str, Callable[[torch.nn.Module, str, str], BuiltRow]] = {
    "lora": build_lora,
    "pissa": build_pissa,
    "balora-fused": build_balora_fused,
    "balora-plain": build_balora_plain,
    "official-style": build_official,
    "balora-fused-chunk1024": build_balora_fused_chunk1024,
}


# -- one measurement (runs in a fresh worker process) -------------------------
@dataclass
class Job:
    row: str
    rep: int
    model: dict[str, Any]
    batch: int
    seq: int
    steps: int
    init: str
    device: str
    seed: int = 0


def _rss_mib() -> float:
    """Current resident set size (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _memory_now_mib(device: str) -> float:
    return torch.cuda.memory_allocated() / 2**20 if device == "cuda" else _rss_mib()


def _peak_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(row: BuiltRow, batch: Batch, optimizer: torch.optim.Optimizer) -> float:
    """Forward + backward + optimizer step + zero_grad; returns the loss."""
    loss = row.loss(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def measure(job: Job) -> dict[str, Any]:
    """Load, build the row, 1 warm-up step, `job.steps` timed steps; time and memory as a dict."""
    torch.manual_seed(job.seed)
    model = load_model(job.model, job.device)
    gc.collect()
    _synchronize(job.device)
    after_load = _memory_now_mib(job.device)
    if job.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batch = random_batch(model.config.vocab_size, job.batch, job.seq, job.seed, job.device)
    with tempfile.TemporaryDirectory(prefix="balora-bench-") as output_dir:
        row = ROW_BUILDERS[job.row](model, job.init, output_dir)
        trainable = [p for p in row.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        losses = [train_step(row, batch, optimizer)]  # warm-up: first-call setup, optimizer state
        path = row.loss_path()
        times = []
        for _ in range(job.steps):
            _synchronize(job.device)
            start = time.perf_counter()
            losses.append(train_step(row, batch, optimizer))
            _synchronize(job.device)
            times.append(time.perf_counter() - start)
    peak = _peak_memory_mib(job.device)
    return {
        **asdict(job), "loss_path": path, "step_times_s": times, "losses": losses,
        "trainable_params": sum(p.numel() for p in trainable),
        "after_load_mib": after_load, "peak_mib": peak, "increment_mib": peak - after_load,
    }


def _context(device: str, fork_server: bool) -> multiprocessing.context.BaseContext:
    """How fresh worker processes start.

    `spawn` gives each worker a fresh interpreter, so its absolute RSS is what a
    user's process would show. A fork server that already imported torch & co.
    saves ~10 s of imports per worker (smoke tests), but its children do not
    count the untouched shared-library pages they inherit (~200 MB less RSS).
    CUDA must not be initialized before a fork, so CUDA always spawns.
    """
    if device == "cuda" or not fork_server:
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(HEAVY_MODULES)
    return context


def run_benchmark(
    model_spec: dict[str, Any], rows: list[str], batch: int, seq: int, reps: int, steps: int,
    init: str = DEFAULT_INIT, fork_server: bool = False, mmap_threshold: int = MMAP_THRESHOLD,
) -> list[dict[str, Any]]:
    """All measurements; repetition r runs the rows rotated by r, each in a fresh process."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if mmap_threshold:  # read by glibc when a worker (or the fork server) starts
        os.environ["GLIBC_TUNABLES"] = f"glibc.malloc.mmap_threshold={mmap_threshold}"
    context = _context(device, fork_server)
    results = []
    for rep in range(reps):
        shift = rep % len(rows)
        for row in rows[shift:] + rows[:shift]:
            job = Job(row, rep, model_spec, batch, seq, steps, init, device)
            pool = context.Pool(processes=1)
            try:
                result = pool.apply(measure, (job,))
            finally:  # close + join, not terminate: the worker exits and cleans up normally
                pool.close()
                pool.join()
            print(
                f"  rep {rep + 1}/{reps} {row:15s} {statistics.median(result['step_times_s']):7.2f} s/step"
                f"  peak {result['peak_mib']:8.0f} MiB (+{result['increment_mib']:.0f})"
                f"  [{result['loss_path']}]",
                flush=True,
            )
            results.append(result)
    return results


# -- summary, report, chart -----------------------------------------------------
@dataclass
class Stat:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        return cls(statistics.median(values), min(values), max(values))


@dataclass
class RowSummary:
    row: str
    loss_path: str
    time_s: Stat
    peak_mib: Stat
    increment_mib: Stat
    ratios: dict[str, float] = field(default_factory=dict)


def summarize(results: list[dict[str, Any]], rows: list[str]) -> list[RowSummary]:
    """Per row: median and min-max over repetitions (a repetition's time is its median step)."""
    summaries = []
    for row in rows:
        mine = [r for r in results if r["row"] == row]
        summaries.append(RowSummary(
            row=row,
            loss_path=mine[0]["loss_path"],
            time_s=Stat.of([statistics.median(r["step_times_s"]) for r in mine]),
            peak_mib=Stat.of([r["peak_mib"] for r in mine]),
            increment_mib=Stat.of([r["increment_mib"] for r in mine]),
        ))
    by_row = {s.row: s for s in summaries}
    if BASELINE in by_row:
        base = by_row[BASELINE]
        for s in summaries:
            s.ratios = {
                "time": s.time_s.median / base.time_s.median,
                "peak": s.peak_mib.median / base.peak_mib.median,
                "increment": s.increment_mib.median / base.increment_mib.median,
            }
    return summaries


@dataclass
class Target:
    name: str
    limit: float
    value: float | None
    value_increment: float | None = None

    def verdict(self, value: float | None) -> str:
        if value is None:
            return "n/a"
        return "PASS" if value <= self.limit else "MISS"


def targets(summaries: list[RowSummary]) -> list[Target]:
    """The issue's three targets; memory judged on the absolute peak, the increment shown too."""
    by_row = {s.row: s for s in summaries}
    fused, lora, official = (by_row.get(name) for name in ("balora-fused", BASELINE, "official-style"))

    def ratio(attr: str, other: RowSummary | None) -> float | None:
        if fused is None or other is None:
            return None
        return getattr(fused, attr).median / getattr(other, attr).median

    return [
        Target("fused step time <= 1.45x LoRA", 1.45, ratio("time_s", lora)),
        Target("fused peak memory <= 1.10x LoRA", 1.10, ratio("peak_mib", lora),
               ratio("increment_mib", lora)),
        Target("fused peak memory <= 0.6x official-style", 0.60, ratio("peak_mib", official),
               ratio("increment_mib", official)),
    ]


def _fmt(stat: Stat, digits: int) -> str:
    return f"{stat.median:.{digits}f} ({stat.low:.{digits}f}–{stat.high:.{digits}f})"


def markdown_report(summaries: list[RowSummary], goals: list[Target]) -> str:
    """The results table and the target verdicts, as markdown."""
    lines = [
        "| row | loss path | step time s, median (min–max) | × LoRA | peak MiB, median (min–max) "
        "| × LoRA | increment MiB, median (min–max) | × LoRA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        r = {k: f"{v:.2f}" for k, v in s.ratios.items()} or dict.fromkeys(("time", "peak", "increment"), "–")
        lines.append(
            f"| {s.row} | {s.loss_path} | {_fmt(s.time_s, 2)} | {r['time']} | {_fmt(s.peak_mib, 0)} "
            f"| {r['peak']} | {_fmt(s.increment_mib, 0)} | {r['increment']} |"
        )
    lines += ["", "| target | measured (absolute peak) | verdict | on the increment | verdict |",
              "|---|---|---|---|---|"]
    for goal in goals:
        value = "–" if goal.value is None else f"{goal.value:.2f}"
        increment = "–" if goal.value_increment is None else f"{goal.value_increment:.2f}"
        increment_verdict = "–" if goal.value_increment is None else goal.verdict(goal.value_increment)
        lines.append(f"| {goal.name} | {value} | {goal.verdict(goal.value)} | {increment} | {increment_verdict} |")
    return "\n".join(lines)


def plot(summaries: list[RowSummary], path: Path, title: str) -> None:
    """Grouped bars per row: step time, absolute peak and peak increment, each as a ratio to LoRA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("time", "step time"), ("peak", "peak memory"), ("increment", "memory increment")]
    width = 0.27
    figure, axes = plt.subplots(figsize=(9, 4.2))
    for index, (key, label) in enumerate(series):
        positions = [i + (index - 1) * width for i in range(len(summaries))]
        values = [s.ratios[key] for s in summaries]
        bars = axes.bar(positions, values, width, label=label)
        axes.bar_label(bars, fmt="%.2f", fontsize=7)
    axes.axhline(1.45, color="tab:blue", linestyle="--", linewidth=0.8, label="time target 1.45×")
    axes.axhline(1.10, color="tab:orange", linestyle="--", linewidth=0.8, label="memory target 1.10×")
    axes.set_xticks(range(len(summaries)), [s.row for s in summaries])
    axes.set_ylabel("ratio to plain LoRA (median)")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, ncols=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(
    results: list[dict[str, Any]], rows: list[str], title: str, out: Path | None, chart: Path | None,
    meta: dict[str, Any],
) -> list[RowSummary]:
    """Print the markdown table and verdicts; write the JSON and the chart if asked."""
    summaries = summarize(results, rows)
    goals = targets(summaries)
    print(f"\n### {title}\n\n{markdown_report(summaries, goals)}\n", flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "meta": meta, "summary": [asdict(s) for s in summaries],
            "targets": [asdict(g) for g in goals], "measurements": results,
        }, indent=1))
    if chart is not None and BASELINE in rows:
        plot(summaries, chart, title)
    return summaries


def _code_version() -> str:
    """The commit measured, marked dirty if the package differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "axolotl_balora") else "")


def run_meta(args: argparse.Namespace, model_spec: dict[str, Any]) -> dict[str, Any]:
    """What a reader needs to reproduce the numbers."""
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "code": _code_version(),
        "date": datetime.date.today().isoformat(),
        "machine": platform.platform(), "processor": platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers_version, "peft": peft_version,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "model": model_spec, "args": {k: str(v) for k, v in vars(args).items()},
    }


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both benchmark scripts share (batch/seq defaults depend on the model)."""
    parser.add_argument("--batch", type=int, help="micro-batch size")
    parser.add_argument("--seq", type=int, help="tokens per sequence")
    parser.add_argument("--reps", type=int, default=3, help="processes per row, interleaved")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process (after 1 warm-up)")
    parser.add_argument("--rows", nargs="+", choices=list(ROW_BUILDERS), default=list(ROWS))
    parser.add_argument("--init", default=DEFAULT_INIT,
                        help="init of the BA-LoRA and official-style rows (pissa = exact SVD, slow here)")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument("--mmap-threshold", type=int, default=MMAP_THRESHOLD,
                        help="CPU workers' glibc mmap threshold in bytes; 0 = glibc's dynamic default")
    parser.add_argument("--out", type=Path, help="write all measurements and the summary as JSON")
    parser.add_argument("--plot", type=Path, help="write the ratio chart (PNG)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser)
    parser.add_argument("--tiny", action="store_true",
                        help="a random tiny LLaMA (vocab 4096) instead of SmolLM2: a fast smoke test")
    args = parser.parse_args()
    args.batch = args.batch or (2 if args.tiny else 4)
    args.seq = args.seq or (128 if args.tiny else 256)
    if args.tiny:
        spec = random_llama_spec("tiny random LLaMA", TINY_SHAPE, "float32", args.attn)
    else:
        spec = smollm2_spec(args.attn)
    title = f"{spec['name']}, batch {args.batch} x {args.seq}, {spec['dtype']}, LoRA r{LORA_RANK} all-linear"
    print(f"{title}: rows {args.rows}, {args.reps} reps x {args.steps} timed steps", flush=True)
    meta = run_meta(args, spec)  # before the run: the code version it starts from
    started = time.perf_counter()
    results = run_benchmark(
        spec, args.rows, args.batch, args.seq, args.reps, args.steps, args.init,
        fork_server=args.tiny, mmap_threshold=args.mmap_threshold,
    )
    report(results, args.rows, title, args.out, args.plot, meta)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
