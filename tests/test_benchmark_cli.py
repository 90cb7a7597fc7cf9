"""The benchmark scripts run through the real `axolotl train` and their summaries are what they say.

One `gpu_check.py --smoke` run (its `cli` section is `overhead_cli.py` with a LoRA and a BA-LoRA
row through `axolotl train`) serves the CLI checks; the rule that each row's ratios are taken
against the LoRA row of the same kernel setting is checked on made-up measurements.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def gpu_check_smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    """The prepared GPU script on CPU with tiny shapes: every code path, so it cannot rot."""
    out = tmp_path_factory.mktemp("gpu-check") / "gpu_check.json"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return done, json.loads(out.read_text())


@pytest.mark.slow
def test_gpu_check_runs_every_section_on_cpu_in_smoke_mode(gpu_check_smoke):
    done, report = gpu_check_smoke
    assert done.returncode == 0, report
    sections = report["sections"]
    assert sections.keys() == {"cli", "fused_memory", "init_time"} and all(s["ok"] for s in sections.values())
    assert sections["cli"]["summary"].keys() == {"lora", "balora"} and "--kernels auto" in sections["cli"]["command"]
    losses = sections["fused_memory"]
    assert losses["fused"]["loss"] == pytest.approx(losses["plain"]["loss"], rel=1e-5)
    assert sections["init_time"]["matrices"] == 7 and sections["init_time"]["seconds"] > 0


@pytest.mark.slow
def test_overhead_cli_rows_are_timed_through_axolotl_train(gpu_check_smoke):
    cli = gpu_check_smoke[1]["sections"]["cli"]
    rows = {m["row"]: m for m in cli["measurements"]}
    assert rows.keys() == {"lora", "balora"}
    for measurement in rows.values():
        assert len(measurement["step_times_s"]) == 3  # 1 warm-up + 2 timed, from the timer plugin
        assert measurement["peak_rss_mib"] >= measurement["rss_at_train_begin_mib"] > 0
    summary = cli["summary"]
    assert summary["lora"]["ratios"]["step_s"] == 1.0
    expected = summary["balora"]["step_s"]["median"] / summary["lora"]["step_s"]["median"]
    assert summary["balora"]["ratios"]["step_s"] == pytest.approx(expected)


def _measurement(row: str, step_s: float) -> dict:
    return {"row": row, "step_times_s": [9.0, step_s, step_s], "peak_rss_mib": 100.0, "cuda_peak_mib": None,
            "peak_rss_at_train_begin_mib": 50.0, "wall_s": 10 * step_s}


def test_kernel_rows_are_measured_against_lora_with_the_same_kernels():
    from overhead_cli import CPU_KERNELS, row_keys, summarize

    rows = ["lora", "balora", "lora-kernels", "balora-kernels"]
    steps = {"lora": 1.0, "balora": 1.5, "lora-kernels": 0.5, "balora-kernels": 0.6}
    summary = summarize([_measurement(row, steps[row]) for row in rows], rows)
    assert summary["lora"]["ratios"]["step_s"] == summary["lora-kernels"]["ratios"]["step_s"] == 1.0
    assert summary["balora"]["ratios"]["step_s"] == pytest.approx(1.5)
    assert summary["balora-kernels"]["ratios"]["step_s"] == pytest.approx(0.6 / 0.5)
    assert row_keys("balora-kernels", "pissa") == {**row_keys("balora", "pissa"), **CPU_KERNELS}
    assert row_keys("lora-kernels", "pissa") == {**row_keys("lora", "pissa"), **CPU_KERNELS}
