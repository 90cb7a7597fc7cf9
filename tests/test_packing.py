"""Sample packing: the regularizers over a packed row equal those over the unpacked batch.

A packed row holds several samples back to back with position_ids restarting at 0
(no attention mask), as Axolotl's packing collator builds it; each sample's first
label is -100 (its prompt), so no scored position crosses a sample boundary.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from axolotl_balora.core import BALoRAConfig, apply_balora
from axolotl_balora.core.ops.fused import LmHeadFactor
from axolotl_balora.core.training.hidden_states import final_hidden_states
from axolotl_balora.core.ops.regularizers import fused_regularizer_terms, plain_regularizer_terms
from axolotl_balora.core.ops.schedules import lambdas_at
from tiny_models import perturb_trainable, VOCAB, tiny_llama

LENGTHS = (7, 5, 9)
CONFIG = BALoRAConfig(lambda_schedule="constant", svd_top_k=3)


def _samples():
    generator = torch.Generator().manual_seed(21)
    samples = []
    for length in LENGTHS:
        ids = torch.randint(0, VOCAB, (length,), generator=generator)
        labels = ids.clone()
        labels[:2] = -100  # prompt
        samples.append((ids, labels))
    return samples


def _packed():
    samples = _samples()
    ids = torch.cat([s[0] for s in samples])[None]
    labels = torch.cat([s[1] for s in samples])[None]
    positions = torch.cat([torch.arange(len(s[0])) for s in samples])[None]
    # No cache: transformers only reads packing from position_ids without one (as in training).
    return {"input_ids": ids, "position_ids": positions, "use_cache": False}, labels


def _padded():
    samples = _samples()
    width = max(LENGTHS)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full((len(samples), width), -100)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for row, (sample_ids, sample_labels) in enumerate(samples):
        ids[row, : len(sample_ids)] = sample_ids
        labels[row, : len(sample_ids)] = sample_labels
        mask[row, : len(sample_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "use_cache": False}, labels


@pytest.fixture(scope="module")
def model():
    model = apply_balora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    perturb_trainable(model, seed=2, scale=0.05)
    return model.eval()


def _plain_terms(model, inputs, labels):
    with torch.no_grad():
        logits = model(**inputs).logits
        with model.disable_adapter():
            ref_logits = model(**inputs).logits
    return plain_regularizer_terms(logits, ref_logits, labels, CONFIG, lambdas_at(CONFIG, 0, 1)).values


def _fused_terms(model, inputs, labels):
    with torch.no_grad():
        hidden = final_hidden_states(model, model, inputs)
        with model.disable_adapter():
            ref_hidden = final_hidden_states(model, model, inputs)
        weight = model.get_base_model().get_output_embeddings().weight
        fused = fused_regularizer_terms(
            hidden, ref_hidden, labels, weight, lambda: LmHeadFactor()(weight), CONFIG,
            lambdas_at(CONFIG, 0, 1),
        )
    return {"task": fused.task, **fused.terms.values}


@pytest.mark.parametrize("path", [_plain_terms, _fused_terms], ids=["plain", "fused"])
def test_packed_row_equals_unpacked_batch(model, path):
    packed = path(model, *_packed())
    padded = path(model, *_padded())
    assert packed.keys() == padded.keys() and {"consistency", "diversity", "svd"} <= packed.keys()
    for name in packed:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_label_crossing_the_boundary_would_change_the_terms(model):
    """The test above can fail: score the first token of sample 2 and the packed terms move."""
    inputs, labels = _packed()
    crossing = labels.clone()
    crossing[0, LENGTHS[0]] = inputs["input_ids"][0, LENGTHS[0]]
    base = _plain_terms(model, inputs, labels)
    moved = _plain_terms(model, inputs, crossing)
    assert abs((base["consistency"] - moved["consistency"]).item()) > 1e-6
