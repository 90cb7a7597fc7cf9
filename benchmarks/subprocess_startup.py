"""Start-up of one test subprocess (what each `axolotl train` process and rank imports) with the
tests' two start-up speed-ups (tests/cpu_distributed): none, the session's `packages_distributions`
cache (metadata_cache.py), and that cache plus a `gc.freeze()` after each full collection
(gc_freeze.py, on in every test process).

Each repetition starts one fresh process per variant, `python -c "import axolotl.train"`, in a
rotating order (the cache folder is filled by a first, untimed process). Run it with the
interpreter of the environment to measure, on quiet cores:

    .venv-0.21/bin/python benchmarks/subprocess_startup.py --reps 5 --out /tmp/subprocess_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_DISTRIBUTED = REPO / "tests" / "cpu_distributed"
IMPORT = "import axolotl.train"
VARIANTS = ("plain", "metadata cache", "metadata cache + gc freeze")
# PYTHONDONTWRITEBYTECODE goes too, as `make test` unexports it: the environments install without
# bytecode, and a child that may not write it recompiles every import (2-3x slower).
DROPPED_VARIABLES = ("PYTHONPATH", "BALORA_TEST_METADATA_CACHE", "BALORA_TEST_GC_FREEZE", "PYTHONDONTWRITEBYTECODE")


def environment(variant: str, cache_dir: str) -> dict[str, str]:
    """The parent's environment with the speed-ups of `variant` and no others."""
    env = {key: value for key, value in os.environ.items() if key not in DROPPED_VARIABLES}
    if variant != "plain":
        env |= {"PYTHONPATH": str(CPU_DISTRIBUTED), "BALORA_TEST_METADATA_CACHE": cache_dir}
    if variant.endswith("gc freeze"):
        env["BALORA_TEST_GC_FREEZE"] = "1"
    return env


def seconds(env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", IMPORT], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{IMPORT!r} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as cache_dir:
        # Fills the cache and compiles the bytecode, as the session's first process does.
        seconds(environment("metadata cache", cache_dir))
        for rep in range(args.reps):
            order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]
            for name in order:
                rows[name].append(seconds(environment(name, cache_dir)))
    medians = {name: statistics.median(times) for name, times in rows.items()}
    ratios = {name: medians[name] / medians["plain"] for name in VARIANTS[1:]}
    result = {"python": sys.version.split()[0], "command": f'python -c "{IMPORT}"', "seconds": rows,
              "median_s": medians, "over_plain": ratios}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"median_s": medians, "over_plain": ratios}))


if __name__ == "__main__":
    main()
