"""Axolotl's own input preparation reaches every BA-LoRA forward (Gemma 3 sample packing).

Under sample packing Axolotl's `compute_loss` deletes the attention mask of a
Gemma 3/4 batch, so the model builds one causal mask per packed sequence from
`position_ids`; with the mask kept, the sequences attend to each other. The
fused path and the reference forward must run on those prepared inputs.
"""

from __future__ import annotations

import pytest
import torch
from axolotl.core.training_args import AxolotlTrainingArguments
from peft import LoraConfig
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from axolotl_balora.core import BALoRAConfig, BALoRATrainerMixin, apply_balora
from axolotl_balora.plugin import BALoRATrainer

VOCAB = 300
LENGTHS = (7, 9)  # two sequences packed into one row


def _tiny_gemma3() -> Gemma3ForConditionalGeneration:
    """The multimodal Gemma 3 class (model_type "gemma3", the one Axolotl's rule names), tiny."""
    config = Gemma3Config(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=64, sliding_window=8, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
    )
    torch.manual_seed(0)
    return Gemma3ForConditionalGeneration(config)


def _packed_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB - 4, (1, sum(LENGTHS)), generator=generator)
    labels = ids.clone()
    labels[0, 0] = labels[0, LENGTHS[0]] = -100  # each sequence's first token predicts nothing
    positions = torch.cat([torch.arange(length) for length in LENGTHS])[None]
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module")
def model():
    peft_model = apply_balora(_tiny_gemma3(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return peft_model.train()


def _trainer(tmp_path, model, chunk_size: int) -> BALoRATrainer:
    args = AxolotlTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, sample_packing=True)
    config = BALoRAConfig(lambda_consistency=1.0, lambda_diversity=0.0, lambda_svd=0.0,
                          lambda_schedule="constant", chunk_size=chunk_size)
    return BALoRATrainer(model=model, args=args, balora_config=config)


@pytest.mark.parametrize("chunk_size", [256, 0], ids=["fused", "plain"])
def test_packed_gemma3_task_loss_equals_axolotls_own(tmp_path, model, chunk_size):
    """At step 0 (PiSSA: consistency 0) the BA-LoRA loss is Axolotl's own task loss."""
    trainer = _trainer(tmp_path, model, chunk_size)
    with torch.no_grad():
        axolotl_loss = super(BALoRATrainerMixin, trainer).compute_loss(model, _packed_batch())
        balora_loss = trainer.compute_loss(model, _packed_batch())
    assert trainer.balora_loss_path.startswith("fused" if chunk_size else "plain")
    logs = trainer._balora_tally.reduce_and_reset(trainer.accelerator, trainer.args.device)
    assert logs["balora/consistency"] < 1e-5  # same inputs (a masked reference: 4e-3)
    torch.testing.assert_close(balora_loss, axolotl_loss, rtol=1e-5, atol=1e-6)


def test_a_kept_attention_mask_would_change_the_loss(model):
    """The check above can fail: the packed sequences attend to each other with the mask kept."""
    batch = _packed_batch()
    with torch.no_grad():
        masked = model(**batch).loss
        del batch["attention_mask"]
        per_sequence = model(**batch).loss
    assert (masked - per_sequence).abs() > 1e-3
