"""Per-method learning rates for the quality study, chosen on validation by a fixed rule.

A comparison at one shared learning rate can reward whichever method that rate suits
("Learning Rate Matters", arXiv 2602.04998, finds PiSSA wants a smaller one than LoRA).
So every method is trained at every rate of one grid (seed 0, scored on the validation
split only) and each gets the rate this rule picks, written down before any test number
of a tuned run existed:

1. the highest validation task score (mean of arithmetic and sentiment accuracy);
2. rates within TIE_MARGIN of that score are ties (about two of the 100 validation
   answers), and among ties the lowest validation drift, KL(base || tuned), wins;
3. a rate whose score is NaN (nothing answered) never wins.

Kept free of torch and axolotl so the rule is tested in the fast suite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# Log-spaced, ~3.16x apart: the shared-rate study's 3e-4 and LoRA's 1e-3 fairness check are
# on it, 1e-4 covers PiSSA's reported preference for a smaller rate. The first grid ended at
# 3e-3, and LoRA's best validation score was that edge (2026-12-04, before any tuned run), so
# one more step, 1e-2, was added for every method: a pick at the edge of a grid says only that
# the optimum may lie beyond it.
LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
TIE_MARGIN = 0.02
SWEEP_SEED = 0


def learning_rate_tag(learning_rate: float) -> str:
    """`3e-4` for 0.0003: the form used in run names and tables."""
    mantissa, exponent = f"{learning_rate:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def run_name(method: str, learning_rate: float, seed: int) -> str:
    """One training run (its adapter folder), shared by the sweep and the tuned seeds."""
    return f"{method}-lr{learning_rate_tag(learning_rate)}-s{seed}"


def task_score(run: dict) -> float:
    """What the rule maximizes: the mean of the two task accuracies."""
    return (run["arithmetic_accuracy"] + run["sentiment_accuracy"]) / 2


def choose_learning_rate(sweep_runs: Iterable[dict]) -> float:
    """The learning rate the rule above picks from one method's sweep points."""
    scored = [run for run in sweep_runs if not math.isnan(task_score(run))]
    if not scored:
        raise ValueError("no sweep point with a task score to choose from")
    best = max(task_score(run) for run in scored)
    ties = [run for run in scored if task_score(run) >= best - TIE_MARGIN]
    return min(ties, key=lambda run: (run["text_kl_base_tuned"], run["learning_rate"]))["learning_rate"]


def chosen_learning_rates(sweep_runs: Iterable[dict], methods: Iterable[str]) -> dict[str, float]:
    """Each method's chosen rate; a method with missing grid points is an error naming them."""
    runs = list(sweep_runs)
    chosen = {}
    for method in methods:
        mine = [run for run in runs if run["method"] == method]
        missing = sorted(set(LEARNING_RATES) - {run["learning_rate"] for run in mine})
        if missing:
            names = ", ".join(run_name(method, rate, SWEEP_SEED) for rate in missing)
            raise ValueError(f"the learning-rate sweep is incomplete for {method}: run {names} first "
                             "(benchmarks/quality.py --stage sweep)")
        chosen[method] = choose_learning_rate(mine)
    return chosen
