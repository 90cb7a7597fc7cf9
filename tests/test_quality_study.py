"""The quality study's data and scoring rules, and its 2-step smoke run through the real CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from quality_tasks import (  # noqa: E402
    BIAS_TASKS, TEST_PRODUCTS, TRAIN_PRODUCTS, VALIDATION_PRODUCTS, TaskSizes, arithmetic_answer, expected_answer,
    held_out_splits, sentiment_answer, training_records, validation_splits,
)
from quality_tuning import (  # noqa: E402
    LEARNING_RATES, TIE_MARGIN, choose_learning_rate, chosen_learning_rates, run_name,
)

# sha256 of the data the committed shared-rate runs trained and were scored on (it must never move).
TRAIN_SHA256 = "6f44e9813d636711418a1a42d876155d549b69d06659aaaf5b2c47e0b30dff61"
TEST_SPLIT_SHA256 = "c0804bb73ec8d9bcc2c2c14a21841d9fa9c73d9e18311ab11e4ea38f7c498a4c"


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


def test_validation_split_never_sees_training_or_test():
    sizes = TaskSizes()
    train = training_records(sizes)
    test = held_out_splits(sizes, train)
    validation = validation_splits(sizes, train, test)
    assert hashlib.sha256(json.dumps(train).encode()).hexdigest() == TRAIN_SHA256
    assert hashlib.sha256(json.dumps(test, sort_keys=True).encode()).hexdigest() == TEST_SPLIT_SHA256
    seen = {r["instruction"] for r in train} | {r["instruction"] for r in test["arithmetic"]}
    assert len({r["instruction"] for r in validation["arithmetic"]} - seen) == sizes.arithmetic_validation
    labels = [r["output"] for r in validation["sentiment"]]
    assert labels.count("negative") == labels.count("positive") == sizes.sentiment_validation // 2
    assert not set(VALIDATION_PRODUCTS) & (set(TRAIN_PRODUCTS) | set(TEST_PRODUCTS))
    assert all(any(p in r["input"] for p in VALIDATION_PRODUCTS) for r in validation["sentiment"])
    assert validation_splits(sizes, train, test) == validation


def sweep_point(method: str, rate: float, arithmetic: float, sentiment: float, kl: float) -> dict:
    return {"method": method, "learning_rate": rate, "arithmetic_accuracy": arithmetic,
            "sentiment_accuracy": sentiment, "text_kl_base_tuned": kl}


def test_the_rule_takes_the_best_validation_score():
    points = [sweep_point("pissa", 1e-4, 0.50, 0.90, 0.01), sweep_point("pissa", 3e-4, 0.80, 1.00, 0.10),
              sweep_point("pissa", 1e-3, 0.70, 0.95, 0.20), sweep_point("pissa", 3e-3, float("nan"), 0.5, 0.9)]
    assert choose_learning_rate(points) == 3e-4


def test_the_rule_breaks_ties_by_lower_drift():
    within = 0.80 - 2 * TIE_MARGIN * 0.9  # task score lower by 0.9 * TIE_MARGIN: a tie
    points = [sweep_point("balora", 3e-4, 0.80, 1.00, 0.10), sweep_point("balora", 1e-3, within, 1.00, 0.05),
              sweep_point("balora", 3e-3, 0.80 - 4 * TIE_MARGIN, 1.00, 0.01)]  # 2x the margin below: no tie
    assert choose_learning_rate(points) == 1e-3


def test_an_incomplete_sweep_names_the_missing_runs():
    points = [sweep_point("lora", rate, 0.5, 0.5, 0.1) for rate in LEARNING_RATES[:-1]]
    with pytest.raises(ValueError, match=rf"{run_name('lora', LEARNING_RATES[-1], 0)} first"):
        chosen_learning_rates(points, ["lora"])
    with pytest.raises(ValueError, match="no sweep point"):
        choose_learning_rate([sweep_point("lora", 1e-4, float("nan"), float("nan"), 0.1)])


def test_tuned_runs_reuse_the_sweep_adapter_and_the_report_shows_both(tmp_path):
    import quality
    from quality_report import write_report

    results, docs = tmp_path / "results", tmp_path / "docs"
    scores = {"sentiment_accuracy": 1.0, "recall_negative": 1.0, "text_perplexity": 70.0, "distinct_2": 0.9,
              "generation_entropy": 2.0, "final_loss": 0.1, "train_seconds": 1.0, "score_seconds": 1.0,
              "seed": 0, "date": "2026-12-03", "machine": "test", "settings": dict(SETTINGS)}
    best = {"lora": 1e-3, "pissa": 1e-4, "balora": 3e-4}
    for run in quality.sweep_runs():
        good = run.method is not None and run.learning_rate == best[run.method]
        quality.write_json(results / "sweep" / f"{run.name}.json", {
            **scores, "method": run.method or "base", "learning_rate": run.learning_rate,
            "arithmetic_accuracy": 0.9 if good else 0.3, "text_kl_base_tuned": 0.05})
    tuned = quality.tuned_runs(results, seeds=3)
    assert {(run.method, run.learning_rate) for run in tuned} == set(best.items())
    assert {run.name for run in tuned if run.seed == 0} == {"lora-lr1e-3-s0", "pissa-lr1e-4-s0", "balora-lr3e-4-s0"}
    assert all(run.split == "test" for run in tuned) and len(tuned) == 9
    ablations = quality.ablation_runs(results, seeds=3)
    assert {run.learning_rate for run in ablations} == {best["balora"]} and len(ablations) == 12
    for run in tuned:
        quality.write_json(results / "tuned" / f"{run.name}.json", {
            **scores, "method": run.method, "learning_rate": run.learning_rate, "seed": run.seed,
            "arithmetic_accuracy": 0.8, "text_kl_base_tuned": 0.04})
    quality.write_json(results / "base.json", {**scores, "method": "base", "arithmetic_accuracy": 0.0,
                                                "text_kl_base_tuned": 0.0})
    for run in quality.bias_runs(results, "skew97", seeds=2, methods=("pissa",)):
        quality.write_json(results / "bias" / "skew97" / f"{run.name}.json", {
            **scores, "method": run.method or "base", "learning_rate": run.learning_rate, "seed": run.seed,
            "arithmetic_accuracy": 0.5, "recall_negative": 0.6, "text_kl_base_tuned": 0.03})
        if run.seed == 0:  # scored with the answer-position probabilities (older runs were not)
            quality.write_json(results / "bias" / "skew97" / f"{run.name}.json", {
                **json.loads((results / "bias" / "skew97" / f"{run.name}.json").read_text()),
                "p_negative_on_negative": 0.2, "p_negative_on_positive": 0.1, "answer_kl_base_tuned": 0.5})
    terms = quality.bias_term_runs(results, "skew97", seeds=3)
    assert {run.method for run in terms} == set(quality.BIAS_TERM_METHODS) and len(terms) == 15
    assert {(run.learning_rate, run.task, run.split) for run in terms} == {(best["balora"], "skew97", "test")}
    assert "balora-consistency-0" in quality.BIAS_TERM_METHODS  # the consistency weight down to 0
    docs.mkdir()
    declaration = "Declared bias task: `skew97` (written before any BA-LoRA run on it)."
    (docs / "results.md").write_text(f"<!-- bias-task:start -->\n{declaration}\n<!-- bias-task:end -->\n")
    report = write_report(results, docs, "test").read_text()
    assert declaration in report  # hand-written, kept across regenerations
    assert "### `skew97`" in report and "| pissa @ 1e-4 | 2 | 0.500 ± 0.000 |" in report
    assert "the minority label at the answer position" in report
    assert "| pissa @ 1e-4 | 1 | 0.200 | 0.100 | 0.500 | 0.600 |" in report  # only the seed scored with it
    assert "| method | seed 0 | seed 1 |" in report and "| pissa @ 1e-4: minority recall | 0.600 | 0.600 |" in report
    assert "| pissa @ 1e-4: P(negative) on negative | 0.200 | – |" in report
    assert "| pissa | 1e-4 | 0.900 | 1.000 | 0.950 | 0.0500 | **yes** |" in report
    assert "| pissa | 3e-4 | 0.300 |" in report and report.count("**yes**") == 3
    assert "| pissa @ 1e-4 | 3 | 0.800 ± 0.000 |" in report
    assert (docs / "img" / "quality_lr_sweep.png").stat().st_size > 0
    assert "![minority class per seed](img/quality_bias_skew97.png)" in report
    assert (docs / "img" / "quality_bias_skew97.png").stat().st_size > 0


def tiny_tuned_model(model_dir):
    """(tokenizer, base, PEFT model): a LoRA with random (non-zero) B, so tuned != base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return tokenizer, base, model.eval()


def test_text_drift_is_perplexity_and_kl_against_the_disabled_adapter(tiny_llama_dir):
    """Windowed batches = the same windows scored one at a time, tuned vs adapter disabled."""
    import math

    import torch

    import quality_metrics as metrics

    tokenizer, base, model = tiny_tuned_model(tiny_llama_dir)
    text = " ".join(f"word{i % 37} and more words" for i in range(200))
    sizes = metrics.EvalSizes(text_windows=3, window_tokens=16, batch=2)
    got = metrics.text_drift(model, tokenizer, text, sizes)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stride = (len(ids) - 16) // 2
    nll, kl, count = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(3):
            window = torch.tensor([ids[i * stride : i * stride + 16]])
            tuned = model(input_ids=window).logits[0, :-1].log_softmax(-1)
            with model.disable_adapter():
                reference = model(input_ids=window).logits[0, :-1].log_softmax(-1)
            nll -= tuned.gather(-1, window[0, 1:, None]).sum().item()
            kl += (reference.exp() * (reference - tuned)).sum().item()
            count += 15
    assert got["text_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert got["text_kl_base_tuned"] == pytest.approx(kl / count, rel=1e-3) and got["text_kl_base_tuned"] > 0
    assert metrics.text_drift(base, tokenizer, text, sizes)["text_kl_base_tuned"] == 0.0


def test_label_probabilities_match_one_prompt_at_a_time(tiny_llama_dir):
    """Left-padded batches with their own positions = each review alone, with and without the adapter."""
    import torch

    import quality_metrics as metrics

    tokenizer, base, model = tiny_tuned_model(tiny_llama_dir)
    reviews = held_out_splits(TaskSizes(arithmetic_test=2, sentiment_test=6), [])["sentiment"]
    assert len({len(tokenizer(r["input"])["input_ids"]) for r in reviews}) > 1  # padding happens
    got = metrics.label_probabilities(model, tokenizer, reviews, metrics.EvalSizes(batch=4))
    minority, by_class, kls = None, {"negative": [], "positive": []}, []
    with torch.no_grad():
        for review in reviews:
            prompt = metrics.alpaca_prompt(review["instruction"], review["input"])
            minority = metrics.answer_token(tokenizer, prompt, "negative")
            ids = tokenizer(prompt, return_tensors="pt")
            tuned = model(**ids).logits[0, -1].log_softmax(-1)
            with model.disable_adapter():
                reference = model(**ids).logits[0, -1].log_softmax(-1)
            by_class[review["output"]].append(tuned[minority].exp().item())
            kls.append((reference.exp() * (reference - tuned)).sum().item())
    for label, values in by_class.items():
        assert got[f"p_negative_on_{label}"] == pytest.approx(sum(values) / len(values), rel=1e-4)
    assert got["answer_kl_base_tuned"] == pytest.approx(sum(kls) / len(kls), rel=1e-3) and got["answer_kl_base_tuned"] > 0
    assert metrics.label_probabilities(base, tokenizer, reviews, metrics.EvalSizes())["answer_kl_base_tuned"] == 0.0


def test_every_method_is_a_valid_balora_config():
    import quality
    from axolotl_balora.args import config_from_mapping

    for method, keys in quality.METHODS.items():
        if keys["adapter"] == "balora":
            config = config_from_mapping(keys)
            assert config.lambda_diversity == keys.get("balora_lambda_diversity", 0.005), method
    assert config_from_mapping(quality.METHODS["balora-constant-lambdas"]).lambda_schedule == "constant"


@pytest.mark.parametrize("name", sorted(BIAS_TASKS))
def test_bias_tasks_are_rarer_and_can_hide_test_words(name):
    sizes, skew = TaskSizes(), BIAS_TASKS[name]
    train = training_records(sizes, skew=skew)
    negatives = [r["input"] for r in train if r["output"] == "negative"]
    assert 0 < len(negatives) == skew.negatives < sizes.sentiment_train // 10
    test = held_out_splits(sizes, train, skew=skew)
    test_negatives = [r["input"] for r in test["sentiment"] if r["output"] == "negative"]
    assert len(test_negatives) == sizes.sentiment_test // 2
    unseen = set(skew.test_negative_words) - set(skew.train_negative_words)
    if unseen:  # the test's negative reviews use only words no training review used
        assert all(any(word in text for word in unseen) for text in test_negatives)
        assert not any(word in text for word in unseen for text in negatives)
    assert test["arithmetic"] == held_out_splits(sizes, training_records(sizes))["arithmetic"]


def test_the_bias_stage_needs_a_declared_task(tmp_path):
    import argparse

    import quality
    from quality_report import declared_bias_task

    docs = tmp_path / "docs"
    docs.mkdir()
    args = argparse.Namespace(results=tmp_path / "results", docs=docs, bias_task=None, seeds=3)
    with pytest.raises(ValueError, match="no bias task declared"):
        quality.planned_runs("bias", args)
    (docs / "results.md").write_text("<!-- bias-task:start -->\nDeclared bias task: `skew97`, because...\n"
                                     "<!-- bias-task:end -->\n")
    assert declared_bias_task(docs / "results.md") == "skew97"
    with pytest.raises(ValueError, match="sweep is incomplete"):  # its rates come from the sweep
        quality.planned_runs("bias", args)


SETTINGS = {"steps": 60, "micro_batch_size": 8, "learning_rate": 3e-4, "lora_r": 8, "sequence_len": 128,
            "target_modules": ["q_proj"], "tasks": {"arithmetic_train": 200, "sentiment_train": 100,
                                                    "arithmetic_test": 60, "sentiment_test": 40},
            "eval": {"text_windows": 8, "window_tokens": 128, "samples_per_prompt": 2, "open_prompts": 8,
                     "diversity_tokens": 40}}


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
    assert runs["base"]["text_kl_base_tuned"] == 0.0 and runs["base"]["answer_kl_base_tuned"] == 0.0
    for run in runs.values():
        assert 0.0 <= run["p_negative_on_negative"] <= 1.0 and 0.0 <= run["p_negative_on_positive"] <= 1.0
    assert runs["lora-s0"]["settings"]["steps"] == 2
    assert "mean_consistency" in runs["balora-s0"] and "mean_consistency" not in runs["lora-s0"]
    report = (docs / "results.md").read_text()
    assert all(f"| {method} | 1 |" in report for method in ("base", "lora", "balora"))
    assert (docs / "img" / "quality.png").stat().st_size > 0
