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
         "--batch", "2", "--seq", "32", "--rows", "lora-kernels", "balora-kernels", "--out", str(out)],
        check=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    result = json.loads(out.read_text())
    rows = {m["row"]: m for m in result["measurements"]}
    assert rows.keys() == {"lora-kernels", "balora-kernels"}
    for measurement in rows.values():
        assert len(measurement["step_times_s"]) == 3  # 1 warm-up + 2 timed, from the timer plugin
        assert measurement["peak_rss_mib"] >= measurement["rss_at_train_begin_mib"] > 0
    summary = result["summary"]
    assert summary["lora-kernels"]["ratios"]["step_s"] == 1.0  # the baseline of its kernel setting
    # BA-LoRA with the kernels is measured against LoRA with the same kernels
    expected = summary["balora-kernels"]["step_s"]["median"] / summary["lora-kernels"]["step_s"]["median"]
    assert summary["balora-kernels"]["ratios"]["step_s"] == pytest.approx(expected)


def test_gpu_check_runs_every_section_on_cpu_in_smoke_mode(tmp_path):
    """The prepared GPU script runs all its code paths on CPU with tiny shapes, so it cannot rot."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    assert done.returncode == 0, report
    sections = report["sections"]
    assert sections.keys() == {"cli", "fused_memory", "init_time"} and all(s["ok"] for s in sections.values())
    assert sections["cli"]["summary"].keys() == {"lora", "balora"} and "--kernels auto" in sections["cli"]["command"]
    losses = sections["fused_memory"]
    assert losses["fused"]["loss"] == pytest.approx(losses["plain"]["loss"], rel=1e-5)
    assert sections["init_time"]["matrices"] == 7 and sections["init_time"]["seconds"] > 0
