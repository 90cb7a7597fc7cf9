"""What a serving engine needs for an exported adapter, said when it is saved.

vLLM serves LoRA adapters up to `--max-lora-rank`, which takes only the values in
VLLM_LORA_RANKS; an adapter above 512 cannot be served as a LoRA at all, and vLLM's
loader refuses `modules_to_save` (most versions). Both have the same way out: merge
the adapter into the base (`axolotl merge-lora`) and serve the merged model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from peft import LoraConfig

LOG = logging.getLogger(__name__)

# The values vLLM's `--max-lora-rank` accepts (vllm.config.LoRAConfig).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MERGE_INSTEAD = "serve the merged model instead (`axolotl merge-lora config.yml`, then vLLM without --enable-lora)"


@dataclass(frozen=True)
class VLLMNeeds:
    """The vLLM flags an adapter needs, or why vLLM cannot serve it as a LoRA."""

    max_lora_rank: int | None  # None: above vLLM's largest
    refusals: tuple[str, ...]

    def flags(self) -> str:
        return f"--enable-lora --max-lora-rank {self.max_lora_rank} --max-loras 1"


def vllm_needs(config: LoraConfig) -> VLLMNeeds:
    refusals = []
    max_lora_rank = next((rank for rank in VLLM_LORA_RANKS if rank >= config.r), None)
    if max_lora_rank is None:
        refusals.append(f"its rank {config.r} (2 x lora_r) is above vLLM's largest LoRA rank, "
                        f"{VLLM_LORA_RANKS[-1]}")
    if config.modules_to_save:
        refusals.append(f"it has modules_to_save ({', '.join(sorted(config.modules_to_save))}), "
                        f"which vLLM's LoRA loader refuses")
    return VLLMNeeds(max_lora_rank, tuple(refusals))


def log_vllm_needs(config: LoraConfig) -> None:
    """One line per save (as the Trainer's own "Saving model checkpoint" line)."""
    needs = vllm_needs(config)
    if needs.refusals:
        LOG.warning("BA-LoRA: vLLM cannot serve this adapter as a LoRA: %s; %s", "; ".join(needs.refusals),
                    MERGE_INSTEAD)
    else:
        LOG.info("BA-LoRA: to serve this adapter with vLLM: vllm serve BASE_MODEL %s --lora-modules "
                 "NAME=ADAPTER_DIR (rank %d, one rank and alpha for every module)", needs.flags(), config.r)
