"""Print where `make demo` put the adapter and the last regularizer values it logged.

Also the parser the CLI tests use: the Trainer prints each training log as a
Python dict literal on stdout, and `training_logs` reads those back.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

_LOG_DICT = re.compile(r"\{'loss': .*?\}")


def training_logs(output: str) -> list[dict[str, float]]:
    """The per-step training log dicts printed in `output`, values as floats."""
    logs = []
    for match in _LOG_DICT.finditer(output):
        raw = ast.literal_eval(match.group(0))
        logs.append({key: float(value) for key, value in raw.items()})
    return logs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output_dir", type=Path, help="the run's output_dir (holds train.log)")
    output_dir = parser.parse_args().output_dir
    logs = training_logs((output_dir / "train.log").read_text(errors="replace"))
    adapter = output_dir / "adapter_model.safetensors"
    if not logs or not adapter.exists():
        print(f"[demo] no finished BA-LoRA run found in {output_dir}", file=sys.stderr)
        return 1
    last = logs[-1]
    print(f"[demo] adapter (standard PEFT LoRA for the original base): {output_dir.resolve()}")
    print(f"[demo] {len(logs)} logged steps; last step:")
    for key in ("loss", "balora/consistency", "balora/diversity", "balora/svd",
                "balora/lambda_consistency", "balora/lambda_diversity", "balora/lambda_svd"):
        if key in last:
            print(f"    {key:28s} {last[key]:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
