"""Start-up of one test subprocess (what each `axolotl train` process and rank imports), with and
without the test session's `packages_distributions` cache (tests/cpu_distributed/metadata_cache.py).

Each repetition starts two fresh processes, `python -c "import axolotl.train"`, in alternating
order: one with the environment every test subprocess gets (tests/cpu_distributed on PYTHONPATH,
the cache folder filled by a first, untimed process) and one without. Run it with the interpreter
of the environment to measure, on quiet cores:

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


def environment(cache_dir: str | None) -> dict[str, str]:
    """The parent's environment with or without the tests' start-up folder and cache."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "BALORA_TEST_METADATA_CACHE")}
    if cache_dir is not None:
        env |= {"PYTHONPATH": str(CPU_DISTRIBUTED), "BALORA_TEST_METADATA_CACHE": cache_dir}
    return env


def seconds(env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORT], env=env, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows: dict[str, list[float]] = {"without cache": [], "with cache": []}
    with tempfile.TemporaryDirectory() as cache_dir:
        seconds(environment(cache_dir))  # fills the cache, as the session's first process does
        for rep in range(args.reps):
            order = ["without cache", "with cache"] if rep % 2 == 0 else ["with cache", "without cache"]
            for name in order:
                rows[name].append(seconds(environment(cache_dir if name == "with cache" else None)))
    medians = {name: statistics.median(times) for name, times in rows.items()}
    result = {"python": sys.version.split()[0], "command": f'python -c "{IMPORT}"', "seconds": rows,
              "median_s": medians, "with_over_without": medians["with cache"] / medians["without cache"]}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"median_s": medians, "with_over_without": result["with_over_without"]}))


if __name__ == "__main__":
    main()
