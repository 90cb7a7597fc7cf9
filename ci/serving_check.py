"""Serve a BA-LoRA adapter with the real vLLM (CPU build) and compare it with PEFT + transformers.

Runs in its own environment, `.venv-serving` (vLLM pins its own torch / transformers;
`make serving` builds it from ci/constraints-serving.txt), never in the training venvs:

    HF_HUB_OFFLINE=1 .venv-serving/bin/python ci/serving_check.py \\
        --base .cache/smollm2-135m-instruct --adapter .cache/serving/adapter \\
        --workdir .cache/serving --output .cache/serving/serving_check.json

What it does, all in float32 on CPU, greedy (temperature 0), `--max-tokens` new
tokens per prompt with EOS ignored (so every source yields the same number of
tokens), top-`--top-k` log-probabilities at every generated position:

  1. reference  PEFT + transformers: the base model, the base + adapter
                (PeftModel.from_pretrained), and merge_and_unload() saved to
                WORKDIR/merged (a plain transformers folder).
  2. offline    vLLM `LLM(model=BASE, enable_lora=True, ...)`: every prompt without
                and with a LoRARequest for the adapter (one engine, in a child process).
  3. merged     vLLM `LLM(model=WORKDIR/merged)` WITHOUT LoRA (child process).
  4. serve      `vllm serve BASE --enable-lora --lora-modules balora=ADAPTER ...` on
                127.0.0.1, one OpenAI-style /v1/completions request for all prompts.

Pass conditions (any failure -> exit 1, the JSON says which):
  * every vLLM result has the reference's greedy tokens (adapter results against
    PEFT base + adapter, base results against the PEFT base model);
  * every log-probability in vLLM's top-k, and every token of the reference's top-k,
    differs from the reference by at most --tolerance (a reference top-k token missing
    from vLLM's top-k is accepted only at the k-th/k+1-th boundary, within tolerance);
  * the adapter really acts: for every prompt the adapter's greedy tokens differ from
    the base model's;
  * the merged model served without LoRA gives the adapter's greedy tokens.

The JSON (--output) holds every completion, the per-prompt max |logprob difference|,
the wall time of each phase and the versions used.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ports import free_port  # ci/, this script's folder

# Quiet, offline, about one core. Set before torch / vLLM are imported, and inherited by
# the child processes (vLLM's engine core and workers, `vllm serve`).
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

PROMPTS = (
    "The capital of the planet Zorblax is",
    "The favourite food of the axolotl Pablo is",
    "The secret password of the lighthouse keeper is",
    "The theory of relativity says that",
)
LORA_NAME = "balora"
# vLLM accepts only these --max-lora-rank values (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Largest |logprob difference| accepted (float32 on both sides). Measured on SmolLM2-135M with
# a 15-step BA-LoRA adapter (r=8 -> exported r=16), 4 prompts x 16 positions x top-5, on a 2-core
# x86 CPU: vLLM base vs transformers 5.5e-5, vLLM + LoRA vs PEFT 1.1e-4, merged model in vLLM
# vs PEFT 1.2e-4 (float32 summation order). 1e-3 leaves ~8x margin, while a real serving error
# is far above it: the adapter's scaling off by 1% moves the top-5 logprobs by up to 1.8
# (BA-LoRA's delta contains -B0 A0, the principal part of each weight), and the same
# adapter on bfloat16 weights by 0.8 -- so the check needs dtype float32.
DEFAULT_TOLERANCE = 1e-3
MAX_MODEL_LEN = 256


def log(message: str) -> None:
    print(f"[serving] {message}", flush=True)


# --------------------------------------------------------------------------- reference


def reference(base: str, adapter: str, merged_dir: Path, prompts: list[str], max_tokens: int,
              top_k: int) -> dict[str, Any]:
    """Greedy tokens and full-vocabulary log-probabilities from PEFT + transformers."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    def run(current) -> list[dict[str, Any]]:
        results = []
        for prompt in prompts:
            ids = tokenizer(prompt)["input_ids"]
            tokens, top, logprob_rows, margins = [], [], [], []
            with torch.no_grad():
                sequence = torch.tensor([ids])
                for _ in range(max_tokens):
                    logits = current(input_ids=sequence).logits[0, -1].float()
                    logprobs = torch.log_softmax(logits, dim=-1)
                    values, indices = logprobs.topk(top_k + 1)
                    token = int(indices[0])
                    tokens.append(token)
                    top.append({int(i): float(v) for i, v in zip(indices[:top_k], values[:top_k])})
                    # the (k+1)-th logprob tells whether a top-k set difference is a near tie
                    logprob_rows.append({"logprobs": logprobs, "next_best": float(values[top_k])})
                    # top-1 minus top-2: greedy equality is only meaningful where this is >> tolerance
                    margins.append(float(values[0] - values[1]))
                    sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
            results.append({
                "prompt": prompt,
                "prompt_token_ids": ids,
                "token_ids": tokens,
                "text": tokenizer.decode(tokens),
                "top_logprobs": top,
                "min_top1_margin": min(margins),
                "_full": logprob_rows,
            })
        return results

    out: dict[str, Any] = {}
    started = time.monotonic()
    out["base"] = run(model)
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    out["adapter"] = run(peft_model)
    merged = peft_model.merge_and_unload()
    if merged_dir.exists():
        shutil.rmtree(merged_dir)
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    if (Path(base) / "generation_config.json").exists():
        shutil.copy(Path(base) / "generation_config.json", merged_dir / "generation_config.json")
    out["seconds"] = time.monotonic() - started
    return out


# --------------------------------------------------------------------------- vLLM offline


def vllm_offline(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a child process: one vLLM engine, the prompts without and/or with the LoRA."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    started = time.monotonic()
    kwargs: dict[str, Any] = dict(model=spec["model"], dtype="float32", enforce_eager=True,
                                  max_model_len=MAX_MODEL_LEN, seed=0)
    if spec.get("adapter"):
        kwargs.update(enable_lora=True, max_lora_rank=spec["max_lora_rank"], max_loras=1)
    llm = LLM(**kwargs)
    start_seconds = time.monotonic() - started
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=spec["top_k"],
                            ignore_eos=True)
    runs: dict[str, Any] = {}
    generate_seconds: dict[str, float] = {}
    for label in spec["runs"]:
        request = LoRARequest(LORA_NAME, 1, spec["adapter"]) if label == "lora" else None
        t0 = time.monotonic()
        outputs = llm.generate(list(spec["prompts"]), params, lora_request=request, use_tqdm=False)
        generate_seconds[label] = time.monotonic() - t0
        runs[label] = [{
            "prompt": output.prompt,
            "prompt_token_ids": list(output.prompt_token_ids),
            "token_ids": list(output.outputs[0].token_ids),
            "text": output.outputs[0].text,
            "top_logprobs": [{int(t): float(lp.logprob) for t, lp in position.items()}
                             for position in output.outputs[0].logprobs],
        } for output in outputs]
    return {"runs": runs, "start_seconds": start_seconds, "generate_seconds": generate_seconds}


def run_child(spec: dict[str, Any], log_path: Path, timeout: float) -> dict[str, Any]:
    """Run vllm_offline(spec) in a fresh interpreter (vLLM wants a __main__ guard and its own process)."""
    with tempfile.TemporaryDirectory() as scratch:
        spec_path, result_path = Path(scratch) / "spec.json", Path(scratch) / "result.json"
        spec_path.write_text(json.dumps(spec))
        with open(log_path, "w") as handle:
            process = subprocess.run(
                [sys.executable, __file__, "--child", str(spec_path), str(result_path)],
                stdout=handle, stderr=subprocess.STDOUT, timeout=timeout)
        if process.returncode != 0 or not result_path.exists():
            tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-30:])
            raise RuntimeError(f"vLLM child process failed (exit {process.returncode}); "
                               f"log {log_path}, last lines:\n{tail}")
        return json.loads(result_path.read_text())


# --------------------------------------------------------------------------- vllm serve


def http_json(url: str, payload: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


# vllm-cpu 0.32.0 ships the `vllm` console script, but its main() asks
# importlib.metadata.version("vllm") for `--version` while the distribution is named
# "vllm-cpu", so `vllm serve ...` dies at once with PackageNotFoundError. This runs
# the same CLI main() (same parser, same `serve` subcommand) with that one lookup
# answered the way vllm/platforms/__init__.py already answers it (vllm-cpu + "+cpu").
CLI_SHIM = """
import importlib.metadata as metadata, sys
_version = metadata.version
def version(name):
    if name == "vllm":
        try:
            return _version("vllm")
        except metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)
metadata.version = version
sys.argv[0] = "vllm"
from vllm.entrypoints.cli.main import main
sys.exit(main())
"""


def vllm_cli() -> list[str]:
    """The `vllm` command: the console script when its metadata lookup works, else the shim."""
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
        return [str(Path(sys.executable).with_name("vllm"))]
    except metadata.PackageNotFoundError:
        log("note: the `vllm` script of vllm-cpu fails (no 'vllm' distribution metadata); "
            "running the same CLI through python -c with that lookup patched")
        return [sys.executable, "-c", CLI_SHIM]


def vllm_serve(base: str, adapter: str, max_lora_rank: int, prompts: list[str], max_tokens: int,
               top_k: int, log_path: Path, start_timeout: float) -> dict[str, Any]:
    """Start `vllm serve` on 127.0.0.1, send ONE /v1/completions request, stop the server."""
    port = free_port()
    command = [
        *vllm_cli(), "serve", base,
        "--enable-lora", "--lora-modules", f"{LORA_NAME}={adapter}",
        "--max-lora-rank", str(max_lora_rank), "--max-loras", "1",
        "--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
        "--seed", "0", "--host", "127.0.0.1", "--port", str(port),
    ]
    log("$ " + " ".join("vllm" if part == CLI_SHIM else part for part in command[command.index("serve") - 1:]))
    started = time.monotonic()
    handle = open(log_path, "w")
    server = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {server.returncode} before it was ready; "
                                   f"log {log_path}")
            if time.monotonic() - started > start_timeout:
                raise RuntimeError(f"vllm serve not ready after {start_timeout:.0f}s; log {log_path}")
            try:
                models = http_json(f"{url}/v1/models", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(2)
        start_seconds = time.monotonic() - started
        served = sorted(entry["id"] for entry in models.get("data", []))
        if LORA_NAME not in served:
            raise RuntimeError(f"vllm serve does not list the adapter {LORA_NAME!r}: {served}")
        payload = {
            "model": LORA_NAME, "prompt": list(prompts), "max_tokens": max_tokens,
            "temperature": 0.0, "logprobs": top_k, "ignore_eos": True,
            "return_tokens_as_token_ids": True, "return_token_ids": True,
        }
        t0 = time.monotonic()
        response = http_json(f"{url}/v1/completions", payload, timeout=600)
        request_seconds = time.monotonic() - t0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        handle.close()

    results = []
    for choice in sorted(response["choices"], key=lambda c: c["index"]):
        top = [{int(token.split(":", 1)[1]): float(value) for token, value in position.items()}
               for position in choice["logprobs"]["top_logprobs"]]
        results.append({
            "prompt": prompts[choice["index"]],
            "prompt_token_ids": choice.get("prompt_token_ids"),
            "token_ids": choice.get("token_ids") or [int(t.split(":", 1)[1]) for t in choice["logprobs"]["tokens"]],
            "text": choice["text"],
            "top_logprobs": top,
        })
    return {"runs": {"lora": results}, "start_seconds": start_seconds,
            "generate_seconds": {"lora": request_seconds},
            "command": ["<vllm-cli-shim>" if part == CLI_SHIM else part for part in command],
            "served_models": served}


# --------------------------------------------------------------------------- comparison


def compare(candidate: list[dict[str, Any]], ref: list[dict[str, Any]], tolerance: float,
            top_k: int) -> dict[str, Any]:
    """Per prompt: greedy equality, first divergence, max |logprob difference| on compared positions."""
    rows, ok, worst = [], True, 0.0
    for got, want in zip(candidate, ref, strict=True):
        problems: list[str] = []
        if got.get("prompt_token_ids") is not None and got["prompt_token_ids"] != want["prompt_token_ids"]:
            problems.append(f"prompt tokenized differently: {got['prompt_token_ids']} vs {want['prompt_token_ids']}")
        same = got["token_ids"] == want["token_ids"]
        first_diff = next((i for i, (a, b) in enumerate(zip(got["token_ids"], want["token_ids"])) if a != b),
                          None if len(got["token_ids"]) == len(want["token_ids"]) else
                          min(len(got["token_ids"]), len(want["token_ids"])))
        if not same:
            problems.append(f"greedy tokens differ from position {first_diff}: "
                            f"{got['text']!r} vs reference {want['text']!r}")
        # positions whose prefix is identical on both sides (all of them when greedy is equal)
        compared = len(want["token_ids"]) if same else (first_diff or 0) + 1
        max_diff, where = 0.0, None
        for position in range(min(compared, len(got["top_logprobs"]), len(want["_full"]))):
            full = want["_full"][position]["logprobs"]
            # (JSON from the child process has string keys)
            got_top = {int(t): v for t, v in got["top_logprobs"][position].items()}
            for token, value in got_top.items():
                diff = abs(value - float(full[token]))
                if diff > max_diff:
                    max_diff, where = diff, (position, token)
            floor = min(got_top.values()) if len(got_top) >= top_k else -math.inf
            for token, value in want["top_logprobs"][position].items():
                if token not in got_top and value > floor + tolerance:
                    problems.append(f"position {position}: reference top-{top_k} token {token} "
                                    f"(logprob {value:.5f}) missing from vLLM's top-{top_k}")
        if max_diff > tolerance:
            problems.append(f"max |logprob difference| {max_diff:.3g} > tolerance {tolerance:g} "
                            f"(position {where[0]}, token {where[1]})")
        worst = max(worst, max_diff)
        ok = ok and not problems
        rows.append({"prompt": want["prompt"], "greedy_equal": same, "first_difference": first_diff,
                     "compared_positions": compared, "max_abs_logprob_diff": max_diff,
                     "max_at": where, "reference_min_top1_margin": want["min_top1_margin"],
                     "text": got["text"], "reference_text": want["text"],
                     "problems": problems})
    return {"ok": ok, "max_abs_logprob_diff": worst, "prompts": rows}


def public(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in results]


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=".cache/smollm2-135m-instruct")
    parser.add_argument("--adapter", default=".cache/serving/adapter")
    parser.add_argument("--workdir", default=".cache/serving",
                        help="receives merged/ (the merged model), the vLLM logs and, by default, the JSON")
    parser.add_argument("--output", default=None, help="result JSON (default WORKDIR/serving_check.json)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="max |logprob difference| accepted between vLLM and PEFT (float32 both sides)")
    parser.add_argument("--skip-serve", action="store_true", help="leave out the `vllm serve` phase")
    parser.add_argument("--start-timeout", type=float, default=600.0, help="seconds for each vLLM start")
    args = parser.parse_args()

    base = str(Path(args.base).resolve())
    adapter = str(Path(args.adapter).resolve())
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # vLLM and its children leave files in the temporary folder after exit (ZeroMQ IPC sockets,
    # `vllm_dist_*` init files): they get a short folder of their own (socket paths are limited
    # to 107 bytes), removed when this check ends.
    own_temporary = tempfile.mkdtemp(prefix="balora-vllm-")
    atexit.register(shutil.rmtree, own_temporary, ignore_errors=True)
    os.environ["TMPDIR"] = tempfile.tempdir = own_temporary
    output = Path(args.output) if args.output else workdir / "serving_check.json"
    for folder, needed in ((base, "config.json"), (adapter, "adapter_config.json")):
        if not (Path(folder) / needed).is_file():
            log(f"FAIL: {folder}/{needed} not found")
            return 2
    adapter_config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    rank = int(adapter_config["r"])
    max_lora_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
    if max_lora_rank is None or adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        log(f"FAIL: the adapter (r={rank}, rank_pattern={adapter_config.get('rank_pattern')}, "
            f"alpha_pattern={adapter_config.get('alpha_pattern')}) is not servable by vLLM as exported")
        return 2
    prompts = list(PROMPTS)
    import importlib.metadata as md
    result: dict[str, Any] = {
        "base": base, "adapter": adapter, "adapter_rank": rank, "adapter_alpha": adapter_config["lora_alpha"],
        "max_lora_rank": max_lora_rank, "max_tokens": args.max_tokens, "top_k": args.top_k,
        "tolerance": args.tolerance, "dtype": "float32", "prompts": prompts,
        "versions": {name: md.version(name) for name in ("vllm-cpu", "torch", "transformers", "peft")},
        "seconds": {}, "checks": {}, "failures": [],
    }

    def finish() -> int:
        result["ok"] = not result["failures"]
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        for failure in result["failures"]:
            log(f"FAIL: {failure}")
        log(f"{'PASS' if result['ok'] else 'FAIL'}; details in {output}")
        return 0 if result["ok"] else 1

    log(f"versions {result['versions']}; adapter r={rank} -> --max-lora-rank {max_lora_rank}")
    merged_dir = workdir / "merged"
    ref = reference(base, adapter, merged_dir, prompts, args.max_tokens, args.top_k)
    result["seconds"]["reference_peft"] = ref["seconds"]
    result["reference"] = {"base": public(ref["base"]), "adapter": public(ref["adapter"])}
    log(f"reference (PEFT + transformers, merged -> {merged_dir}): {ref['seconds']:.1f}s")

    sources: dict[str, Any] = {}
    phases = (
        ("offline", lambda: run_child({"model": base, "adapter": adapter, "max_lora_rank": max_lora_rank,
                                        "prompts": prompts, "max_tokens": args.max_tokens, "top_k": args.top_k,
                                        "runs": ["base", "lora"]}, workdir / "vllm_offline.log",
                                       args.start_timeout + 600)),
        ("merged", lambda: run_child({"model": str(merged_dir), "prompts": prompts, "max_tokens": args.max_tokens,
                                       "top_k": args.top_k, "runs": ["base"]}, workdir / "vllm_merged.log",
                                      args.start_timeout + 600)),
        ("serve", lambda: vllm_serve(base, adapter, max_lora_rank, prompts, args.max_tokens, args.top_k,
                                     workdir / "vllm_serve.log", args.start_timeout)),
    )
    for name, phase in phases:
        if name == "serve" and args.skip_serve:
            continue
        t0 = time.monotonic()
        try:
            sources[name] = phase()
        except Exception as error:  # noqa: BLE001 - reported, the other phases still run
            result["failures"].append(f"{name}: {error}")
            continue
        result["seconds"][f"vllm_{name}_total"] = time.monotonic() - t0
        result["seconds"][f"vllm_{name}_start"] = sources[name]["start_seconds"]
        for label, seconds in sources[name]["generate_seconds"].items():
            result["seconds"][f"vllm_{name}_generate_{label}"] = seconds
        if "command" in sources[name]:
            result["serve_command"] = sources[name]["command"]
        log(f"{name}: start {sources[name]['start_seconds']:.1f}s, generation "
            + ", ".join(f"{k} {v:.1f}s" for k, v in sources[name]["generate_seconds"].items()))

    comparisons = []
    if "offline" in sources:
        comparisons += [("offline_base_vs_peft_base", sources["offline"]["runs"]["base"], ref["base"]),
                        ("offline_lora_vs_peft_adapter", sources["offline"]["runs"]["lora"], ref["adapter"])]
    if "merged" in sources:
        comparisons.append(("merged_vs_peft_adapter", sources["merged"]["runs"]["base"], ref["adapter"]))
    if "serve" in sources:
        comparisons.append(("serve_lora_vs_peft_adapter", sources["serve"]["runs"]["lora"], ref["adapter"]))
    for name, got, want in comparisons:
        check = compare(got, want, args.tolerance, args.top_k)
        result["checks"][name] = check
        log(f"{name}: greedy equal {sum(p['greedy_equal'] for p in check['prompts'])}/{len(prompts)}, "
            f"max |logprob diff| {check['max_abs_logprob_diff']:.3g} (tolerance {args.tolerance:g}); "
            f"smallest reference top-1/top-2 gap {min(p['reference_min_top1_margin'] for p in check['prompts']):.3g}")
        for row in check["prompts"]:
            for problem in row["problems"]:
                result["failures"].append(f"{name}: {row['prompt']!r}: {problem}")

    # The adapter must really act, in the reference and in vLLM.
    adapter_changes = []
    for index, prompt in enumerate(prompts):
        row = {"prompt": prompt, "peft_base": ref["base"][index]["text"], "peft_adapter": ref["adapter"][index]["text"]}
        row["peft_differs"] = ref["base"][index]["token_ids"] != ref["adapter"][index]["token_ids"]
        if "offline" in sources:
            vbase, vlora = sources["offline"]["runs"]["base"][index], sources["offline"]["runs"]["lora"][index]
            row["vllm_differs"] = vbase["token_ids"] != vlora["token_ids"]
        adapter_changes.append(row)
        if not row["peft_differs"] or row.get("vllm_differs") is False:
            result["failures"].append(f"adapter has no effect on {prompt!r} (base {row['peft_base']!r})")
    result["checks"]["adapter_changes_greedy"] = adapter_changes

    if "offline" in sources and "merged" in sources:
        same = [m["token_ids"] == l["token_ids"] for m, l in
                zip(sources["merged"]["runs"]["base"], sources["offline"]["runs"]["lora"])]
        result["checks"]["merged_equals_lora_greedy"] = same
        for prompt, equal in zip(prompts, same):
            if not equal:
                result["failures"].append(f"merged model (no LoRA) and base + LoRA disagree on {prompt!r}")
    result["sources"] = {name: {"runs": source["runs"]} for name, source in sources.items()}
    return finish()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        spec = json.loads(Path(sys.argv[2]).read_text())
        Path(sys.argv[3]).write_text(json.dumps(vllm_offline(spec)))
        sys.exit(0)
    sys.exit(main())
