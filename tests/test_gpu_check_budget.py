"""gpu_check.py's --budget-s: a section past the budget is cut and recorded as such, with every
process it started; a section after it is recorded as not started; one within it is untouched."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def budget(seconds: float) -> argparse.Namespace:
    return argparse.Namespace(budget_s=seconds, deadline=time.monotonic() + seconds)


def alive(pid: int) -> bool:
    """Running or stopped, not gone and not a zombie (a killed orphan may wait to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_section_past_the_budget_is_cut_and_the_next_is_not_started(monkeypatch):
    monkeypatch.setitem(gpu_check.RUNNERS, "init_time", lambda args: time.sleep(30) or {"seconds": 30})
    args = budget(0.5)
    started = time.monotonic()
    cut = gpu_check.run_section("init_time", args)
    assert time.monotonic() - started < 5
    assert cut["ok"] is False and cut["cut_by_budget"] is True and "cut by --budget-s 0.5" in cut["error"]
    after = gpu_check.run_section("fused_memory", args)
    assert after == {"ok": False, "cut_by_budget": True, "error": "not started: the --budget-s 0.5 s were spent"}


def test_a_section_within_the_budget_keeps_its_figures(monkeypatch):
    monkeypatch.setitem(gpu_check.RUNNERS, "init_time", lambda args: {"seconds": 0.1})
    assert gpu_check.run_section("init_time", budget(30)) == {"ok": True, "seconds": 0.1}
    monkeypatch.setitem(gpu_check.RUNNERS, "init_time", lambda args: 1 / 0)
    failed = gpu_check.run_section("init_time", budget(30))
    assert failed["ok"] is False and "cut_by_budget" not in failed and failed["error"].startswith("ZeroDivisionError")


def test_a_cut_stops_the_command_and_what_it_started(tmp_path):
    log = tmp_path / "out.log"
    # The shell starts a grandchild in the background, prints its pid, and waits.
    command = ["bash", "-c", "sleep 60 & echo child $!; wait"]
    with pytest.raises(gpu_check.BudgetSpent) as cut, gpu_check.time_limit(1.0):
        gpu_check.run_in_group(command, tmp_path, log)
    grandchild = int(log.read_text().split()[1])
    assert "child" in str(cut.value)  # the output before the cut comes with it
    deadline = time.monotonic() + 15
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(grandchild)
