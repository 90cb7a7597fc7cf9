"""Preference training through `axolotl train`: DPO, IPO, KTO, ORPO and SimPO with LoRA, then BA-LoRA.

The datasets are written the way axolotl's own examples are: chat_template pairs for
DPO / IPO / SimPO, argilla-style threads for ORPO, `chatml.intel` rows for KTO.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pytest

from tiny_assets import kto_records, preference_records, write_jsonl
from workflows import WorkflowRun, assert_balora_trained, assert_vanilla_peft_loads, run_both

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("preference-data")
    pairs = preference_records(48, seed=1)
    # argilla rows carry the chosen / rejected threads only (a `messages` column would be kept
    # beside the rendered strings, and TRL's ORPO would read the row as a conversation again)
    argilla = [{key: pair[key] for key in ("chosen", "rejected")} for pair in pairs]
    return {"pairs": write_jsonl(pairs, folder / "pairs.jsonl"), "argilla": write_jsonl(argilla, folder / "argilla.jsonl"),
            "kto": write_jsonl(kto_records(48, seed=1), folder / "kto.jsonl")}


def _workflow(rl: str, data: dict[str, Path]) -> dict:
    """The YAML keys of one preference workflow, as a user writes them."""
    pairs = {"path": str(data["pairs"]), "ds_type": "json", "split": "train", "type": "chat_template.default"}
    if rl == "kto":
        return {"rl": "kto", "remove_unused_columns": False, "datasets": [
            {"path": str(data["kto"]), "ds_type": "json", "split": "train", "type": "chatml.intel"}]}
    if rl == "orpo":
        return {"rl": "orpo", "chat_template": "chatml", "datasets": [
            {**pairs, "path": str(data["argilla"]), "type": "chat_template.argilla"}]}
    extra = {"simpo_gamma": 0.5} if rl == "simpo" else {}
    return {"rl": rl, "chat_template": "chatml", "datasets": [pairs], **extra}


PREFERENCE_RL = ("dpo", "ipo", "kto", "orpo", "simpo")


@pytest.fixture(scope="module")
def run_of(tiny_llama_dir, data, tmp_path_factory) -> Callable[[str], WorkflowRun]:
    """The LoRA and BA-LoRA runs of one `rl:` value, made the first time a test asks for them
    (so selecting one case, as axolotl 0.19's selection in `make test` does, runs only that one)."""
    folder = tmp_path_factory.mktemp("preference-runs")
    runs: dict[str, WorkflowRun] = {}

    def run(rl: str) -> WorkflowRun:
        if rl not in runs:
            runs[rl] = run_both(tiny_llama_dir, data["pairs"], folder / rl, **_workflow(rl, data))
        return runs[rl]

    return run


@pytest.mark.parametrize("rl", PREFERENCE_RL)
def test_preference_training_trains_with_the_terms_and_saves_the_standard_adapter(run_of, rl):
    run = run_of(rl)
    logs = run.balora_logs()
    assert_balora_trained(logs, run.out_dir)
    if rl == "dpo":  # policy = reference at step 0: the DPO loss is ln 2 (logged to 4 decimals)
        assert abs(logs[0]["balora/task_loss"] - math.log(2)) < 2e-4


def test_preference_adapters_load_in_vanilla_peft(run_of, tmp_path):
    """One fresh interpreter reloads every adapter the runs saved."""
    runs = [run_of(rl) for rl in PREFERENCE_RL]
    saved = [run.out_dir for run in runs if run.balora.returncode == 0]
    assert len(saved) == len(PREFERENCE_RL), "a BA-LoRA run failed (see its own test)"
    assert_vanilla_peft_loads(saved, tmp_path)
