"""The quality study's data and scoring rules, and its 2-step smoke run through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from quality_tasks import (  # noqa: E402
    TaskSizes, arithmetic_answer, expected_answer, held_out_splits, sentiment_answer, training_records,
)


def test_splits_are_skewed_balanced_and_disjoint():
    sizes = TaskSizes()
    train = training_records(sizes)
    held_out = held_out_splits(sizes, train)
    sentiment_train = [r["output"] for r in train if r["output"] in ("positive", "negative")]
    assert sentiment_train.count("negative") * 10 == len(sentiment_train) == sizes.sentiment_train
    labels = [r["output"] for r in held_out["sentiment"]]
    assert labels.count("negative") == labels.count("positive") == sizes.sentiment_test // 2
    train_texts = {r["instruction"] for r in train} | {r["input"] for r in train}
    assert not any(r["instruction"] in train_texts for r in held_out["arithmetic"])
    assert len({r["instruction"] for r in held_out["arithmetic"]}) == sizes.arithmetic_test
    assert not any(r["input"] in train_texts for r in held_out["sentiment"])  # unseen products
    assert training_records(sizes) == train  # every run and method trains on the same data


@pytest.mark.parametrize(("text", "answer"), [
    ("7 + 5 = 12. Ana has 12 apples.", 12),
    ("The answer is 17.", 17),
    ("3 x 4 = 13", 13),  # wrong arithmetic is scored as what was answered
    ("I cannot tell.", None),
])
def test_arithmetic_answer(text, answer):
    assert arithmetic_answer(text) == answer


def test_expected_answer_is_the_true_result():
    held_out = held_out_splits(TaskSizes(), training_records(TaskSizes()))
    for record in held_out["arithmetic"]:
        a, op, b = record["output"].split(" = ")[0].split()
        assert expected_answer(record) == {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op]


@pytest.mark.parametrize(("text", "label"), [
    ("Negative.", "negative"), ("positive", "positive"), ("It is not positive, it is negative", "positive"),
    ("neutral", None),
])
def test_sentiment_answer_takes_the_first_label_named(text, label):
    assert sentiment_answer(text) == label


@pytest.mark.slow
def test_smoke_run_trains_scores_and_reports(tmp_path):
    results, docs = tmp_path / "results", tmp_path / "docs"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), "--smoke",
                    "--results", str(results), "--docs", str(docs)], check=True, cwd=REPO, timeout=1800)
    runs = {path.stem: json.loads(path.read_text()) for path in results.glob("*.json")}
    assert set(runs) == {"base", "lora-s0", "balora-s0"}
    for name, run in runs.items():
        for key in ("arithmetic_accuracy", "sentiment_accuracy", "recall_negative", "text_perplexity",
                    "text_kl_base_tuned", "distinct_2", "generation_entropy"):
            assert run[key] == run[key], f"{name}: {key} is NaN"
    assert runs["base"]["text_kl_base_tuned"] == 0.0
    assert runs["lora-s0"]["settings"]["steps"] == 2
    assert "mean_consistency" in runs["balora-s0"] and "mean_consistency" not in runs["lora-s0"]
    report = (docs / "results.md").read_text()
    assert all(f"| {method} | 1 |" in report for method in ("base", "lora", "balora"))
    assert (docs / "img" / "quality.png").stat().st_size > 0
