"""Which kind of model the adapter sits on: the init and the loss form both ask."""

from __future__ import annotations

from peft import PeftModel
from torch import nn

SEQUENCE_CLASSIFIER_SUFFIX = "ForSequenceClassification"
# Attribute names of the classification head, tried in order: BERT, DeBERTa, RoBERTa
# and most encoders call it `classifier`; Llama-like decoders call it `score`.
HEAD_NAMES = ("classifier", "score")


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def is_sequence_classifier(model: nn.Module) -> bool:
    return type(base_model_of(model)).__name__.endswith(SEQUENCE_CLASSIFIER_SUFFIX)
