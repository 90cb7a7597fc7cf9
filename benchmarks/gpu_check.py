"""Every GPU measurement this project still owes, as one prepared run for the day a GPU is lent.

    python benchmarks/gpu_check.py --out gpu_check.json            # one H100 / H200: about 6 minutes
    python benchmarks/gpu_check.py --smoke --out /tmp/check.json   # CPU, tiny shapes (make test runs it)
    bash benchmarks/gpu_slot.sh OUT_DIR     # on a GPU node without network: the bundle, then this

Three sections, the two short ones first; each writes its result, or the error that stopped it,
into the JSON, and the next one still runs (a GPU lease is too short to lose to one failure):

1. `fused_memory`: peak CUDA memory and time of the fused loss against the plain one (task
   cross-entropy + the three terms from full logits), forward and backward, at a 128k vocabulary;
2. `init_time`: the PiSSA init of one Llama-2-7B-shaped decoder layer (7 matrices, r 128,
   `pissa_niter_16`) on the GPU;
3. `cli`: plain LoRA against BA-LoRA through the real `axolotl train` (benchmarks/overhead_cli.py),
   with the fused LoRA kernels as axolotl and the plugin set them by default, bf16,
   flash-attention 2 (sdpa when flash_attn is not installed: recorded) and sample packing, on
   a random-weight model of Llama-3.2-1B's shape (128k vocabulary).

`--budget-s` bounds the whole run: a section still running when it is spent is stopped (the
`cli` section's `axolotl train` processes with it) and recorded as cut by the budget, with the
output it had printed; a section not yet started is recorded as not started. The JSON also
records the version of each package the run imported, and where it came from, so a run from
the GPU bundle (benchmarks/gpu_slot.sh) shows which of the image's packages it shadowed.

`--smoke` runs the same code on CPU with tiny shapes (float32, sdpa, no memory figures), so the
script cannot rot between leases. Needs axolotl (for `cli`) and this package installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager, suppress
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

BENCHMARKS = Path(__file__).resolve().parent
SECTIONS = ("fused_memory", "init_time", "cli")
# Distribution -> its module: the report records each one's version (from its metadata) and the
# folder its module is imported from, which tells the image's packages from the bundle's (and
# numba's stand-in in the bundle, which has no metadata).
PACKAGES = {"torch": "torch", "triton": "triton", "transformers": "transformers", "accelerate": "accelerate",
            "peft": "peft", "trl": "trl", "datasets": "datasets", "axolotl": "axolotl",
            "axolotl-balora": "axolotl_balora", "bitsandbytes": "bitsandbytes", "flash-attn": "flash_attn",
            "pydantic": "pydantic", "numba": "numba"}
# (vocab, hidden, batch, seq) of the loss-memory section.
LOSS_SHAPE = {"gpu": (128256, 4096, 4, 2048), "smoke": (512, 32, 2, 16)}
# One decoder layer's worth of matrices: Llama-2-7B on the GPU, tiny in the smoke run.
LAYER_SHAPE = {"gpu": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                       "num_key_value_heads": 32},
               "smoke": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                         "num_key_value_heads": 2}}


class BudgetSpent(Exception):
    """The --budget-s time ran out while a section was running."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise BudgetSpent in the main thread once `seconds` have passed (None: no limit)."""
    if seconds is None:
        yield
        return

    def expire(_signum: int, _frame: object) -> None:
        raise BudgetSpent

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def package_versions() -> dict[str, dict[str, str | None] | None]:
    """Version and folder of each of `PACKAGES` as this interpreter finds them (None: not installed)."""
    found: dict[str, dict[str, str | None] | None] = {}
    for name, module in PACKAGES.items():
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            found[name] = None
            continue
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = None
        found[name] = {"version": version, "location": str(Path(spec.origin).parents[1])}
    return found


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_mib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def cli_section(args: argparse.Namespace) -> dict[str, Any]:
    """overhead_cli.py's lora and balora rows with every default a GPU user gets."""
    attn = "flash_attention_2" if not args.smoke and importlib.util.find_spec("flash_attn") else "sdpa"
    out = Path(args.scratch) / "cli.json"
    model = ["--tiny"] if args.smoke else ["--shape", "llama3.2-1b"]
    precision = [] if args.smoke else ["--bf16"]
    size = ["--batch", "2", "--seq", "32", "--reps", "1", "--steps", "2"] if args.smoke else \
        ["--batch", "4", "--seq", "2048", "--reps", "2", "--steps", "4"]
    command = [sys.executable, str(BENCHMARKS / "overhead_cli.py"), *model, *precision, *size, "--packing",
               "--kernels", "auto", "--attn", attn, "--rows", "lora", "balora", "--out", str(out)]
    log = Path(args.scratch) / "cli.log"
    returncode = run_in_group(command, BENCHMARKS, log)
    if returncode != 0:
        raise RuntimeError(f"overhead_cli.py failed (rc {returncode}): {log.read_text()[-6000:]}")
    result = json.loads(out.read_text())
    return {"attn": attn, "command": " ".join(command[1:]), "summary": result["summary"],
            "measurements": result["measurements"]}


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group; after 10 s (or once its leader is gone) SIGKILL to what is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_in_group(command: list[str], cwd: Path, log: Path) -> int:
    """`command`'s exit status, its output in `log`. It runs in a process group of its own, so that
    a budget cut (or any interruption) stops it with every process under it (`axolotl train`,
    its launcher's ranks); the cut then carries the output printed so far."""
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=cwd, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return process.wait()
        except BaseException as error:
            _stop_group(process)
            if isinstance(error, BudgetSpent):
                raise BudgetSpent(log.read_text()[-4000:]) from None
            raise


def _loss_inputs(device: str, dtype: torch.dtype, shape: tuple[int, int, int, int]):
    vocab, hidden_size, batch, seq = shape
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(batch, seq, hidden_size, device=device, dtype=dtype, generator=generator)
    ref_hidden = hidden + 0.01 * torch.randn(hidden.shape, device=device, dtype=dtype, generator=generator)
    weight = torch.randn(vocab, hidden_size, device=device, dtype=dtype, generator=generator) / hidden_size**0.5
    labels = torch.randint(0, vocab, (batch, seq), device=device, generator=generator)
    return hidden.requires_grad_(), ref_hidden, weight, labels


def _fused_loss(hidden, ref_hidden, weight, labels, config, lambdas) -> torch.Tensor:
    from axolotl_balora.core.ops.fused import LmHeadFactor
    from axolotl_balora.core.ops.regularizers import fused_regularizer_terms

    head_r = LmHeadFactor()
    return fused_regularizer_terms(hidden, ref_hidden, labels, weight, lambda: head_r(weight), config, lambdas).total


def _plain_loss(hidden, ref_hidden, weight, labels, config, lambdas) -> torch.Tensor:
    from axolotl_balora.core.ops.regularizers import plain_regularizer_terms

    logits = hidden @ weight.T
    with torch.no_grad():
        ref_logits = ref_hidden @ weight.T
    task = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
    return task + plain_regularizer_terms(logits, ref_logits, labels, config, lambdas).weighted_sum(lambdas)


def fused_memory_section(args: argparse.Namespace) -> dict[str, Any]:
    """Forward + backward of each loss path on the same inputs: peak memory, seconds, loss."""
    from axolotl_balora.core.config import BALoRAConfig
    from axolotl_balora.core.ops.schedules import lambdas_at

    config = BALoRAConfig(lambda_schedule="constant")
    lambdas = lambdas_at(config, 0, 1)
    shape = LOSS_SHAPE["smoke" if args.smoke else "gpu"]
    dtype = torch.float32 if args.smoke else torch.bfloat16
    rows: dict[str, Any] = {"vocab": shape[0], "hidden": shape[1], "tokens": shape[2] * shape[3], "dtype": str(dtype)}
    for name, loss_fn in (("fused", _fused_loss), ("plain", _plain_loss)):
        inputs = _loss_inputs(args.device, dtype, shape)
        _reset_peak(args.device)
        _synchronize(args.device)
        started = time.perf_counter()
        loss = loss_fn(*inputs, config, lambdas)
        loss.backward()
        _synchronize(args.device)
        rows[name] = {"seconds": time.perf_counter() - started, "peak_mib": _peak_mib(args.device),
                      "loss": loss.item()}
        del inputs, loss
    if rows["fused"]["peak_mib"] and rows["plain"]["peak_mib"]:
        rows["fused_over_plain_memory"] = rows["fused"]["peak_mib"] / rows["plain"]["peak_mib"]
    return rows


def init_time_section(args: argparse.Namespace) -> dict[str, Any]:
    """apply_balora on one decoder layer built on the device (random weights: the time depends on shapes)."""
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from axolotl_balora.core.adapter.pissa_init import apply_balora

    shape = LAYER_SHAPE["smoke" if args.smoke else "gpu"]
    rank = 8 if args.smoke else 128
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(LlamaConfig(**shape, num_hidden_layers=1, vocab_size=256))
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"])
    _synchronize(args.device)
    started = time.perf_counter()
    apply_balora(model, config, init="pissa_niter_16", init_cache=None)
    _synchronize(args.device)
    return {"seconds": time.perf_counter() - started, "matrices": 7, "rank": rank, "shape": shape}


RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "cli": cli_section, "fused_memory": fused_memory_section, "init_time": init_time_section,
}


def run_section(section: str, args: argparse.Namespace) -> dict[str, Any]:
    """One section's result: its figures, or the error or budget cut that stopped it."""
    remaining = None if args.deadline is None else args.deadline - time.monotonic()
    if remaining is not None and remaining <= 0:
        return {"ok": False, "cut_by_budget": True,
                "error": f"not started: the --budget-s {args.budget_s:g} s were spent"}
    try:
        with time_limit(remaining):
            return {"ok": True, **RUNNERS[section](args)}
    except BudgetSpent as cut:
        return {"ok": False, "cut_by_budget": True, "error": f"cut by --budget-s {args.budget_s:g} s",
                "output_before_cut": str(cut)}
    except Exception as error:  # noqa: BLE001 - recorded; the other sections still run
        return {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-4000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write (after every section)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: the same code paths")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for all sections together; what is still running then is stopped")
    args = parser.parse_args()
    args.device = "cpu" if args.smoke else "cuda"
    args.deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on the GPU machine, or --smoke on CPU")
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                              "torch": torch.__version__, "smoke": args.smoke, "budget_s": args.budget_s,
                              "packages": package_versions(), "sections": {}}
    with tempfile.TemporaryDirectory(prefix="balora-gpu-check-") as scratch:
        args.scratch = scratch
        for section in args.sections:
            started = time.perf_counter()
            print(f"[gpu_check] {section} ...", flush=True)
            result = run_section(section, args)
            result["wall_s"] = time.perf_counter() - started
            report["sections"][section] = result
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
            print(f"[gpu_check] {section}: {'ok' if result['ok'] else result['error']} "
                  f"({result['wall_s']:.0f} s)", flush=True)
    sys.exit(0 if all(section["ok"] for section in report["sections"].values()) else 1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
