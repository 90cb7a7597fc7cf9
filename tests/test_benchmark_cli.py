"""The CLI overhead benchmark runs its rows through the real `axolotl train` and reads them back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_overhead_cli_tiny_rows_through_axolotl_train(tmp_path):
    out = tmp_path / "overhead-cli.json"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "overhead_cli.py"), "--tiny", "--reps", "1", "--steps", "2",
         "--batch", "2", "--seq", "32", "--rows", "lora", "balora", "lora-kernels", "balora-kernels", "--out", str(out)],
        check=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    result = json.loads(out.read_text())
    rows = {m["row"]: m for m in result["measurements"]}
    assert rows.keys() == {"lora", "balora", "lora-kernels", "balora-kernels"}
    for measurement in rows.values():
        assert len(measurement["step_times_s"]) == 3  # 1 warm-up + 2 timed, from the timer plugin
        assert measurement["peak_rss_mib"] >= measurement["rss_at_train_begin_mib"] > 0
    summary = result["summary"]
    assert summary["lora"]["ratios"]["step_s"] == summary["lora-kernels"]["ratios"]["step_s"] == 1.0
    # BA-LoRA with the kernels is measured against LoRA with the same kernels
    expected = summary["balora-kernels"]["step_s"]["median"] / summary["lora-kernels"]["step_s"]["median"]
    assert summary["balora-kernels"]["ratios"]["step_s"] == pytest.approx(expected)
