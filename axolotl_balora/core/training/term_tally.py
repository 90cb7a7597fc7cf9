"""Running sums of the BA-LoRA terms between two training logs, kept on the device.

Reading a term with `.item()` every micro-batch would stall the accelerator once
per term per step; the sums stay on the device instead and are read once per
log, after one reduction over all ranks (so the logged value is the mean over
every rank's micro-batches, as the Trainer's own loss is, not rank 0's alone).

The Trainer's logged `loss` is the whole loss, terms included (so is the perplexity a
trainer derives from it). `balora/task_loss` is that same figure without the terms:
the logged loss times the task loss's share of what the micro-batches returned. A share,
not a second average, so it follows whatever scaling the Trainer applied to the loss
(gradient accumulation, token counts across devices) and can be compared with a LoRA run's
`loss` as it is.
"""

from __future__ import annotations

import logging

import torch

from ..ops.regularizers import TERM_NAMES, RegularizerTerms
from ..ops.schedules import Lambdas

LOG = logging.getLogger(__name__)


class TermTally:
    """Sums, kept counts and skips of each term since the last `reduce_and_reset`, on the device."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.micro_batches = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._skipped: dict[str, torch.Tensor] = {}
        self._lambda_sums = dict.fromkeys(TERM_NAMES, 0.0)
        self._task_sum: torch.Tensor | float = 0.0
        self._total_sum: torch.Tensor | float = 0.0

    def add(self, terms: RegularizerTerms, lambdas: Lambdas, task: torch.Tensor | float = 0.0,
            total: torch.Tensor | float = 0.0) -> None:
        """Accumulate one micro-batch's terms (no host sync: a dropped term adds 0 and one skip),
        its task loss and the loss it returned (both as returned, before the Trainer's scaling)."""
        self.micro_batches += 1
        self._task_sum = self._task_sum + _detached(task)
        self._total_sum = self._total_sum + _detached(total)
        for name in TERM_NAMES:
            self._lambda_sums[name] += getattr(lambdas, name)
            if name not in terms.kept:
                continue
            kept = terms.kept[name]
            if name in terms.values:
                value = terms.values[name].detach().float()
                self._accumulate(self._sums, name, torch.where(kept, value, torch.zeros_like(value)))
            self._accumulate(self._counts, name, kept.float())
            self._accumulate(self._skipped, name, (~kept).float())

    @staticmethod
    def _accumulate(totals: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        totals[name] = totals[name] + value if name in totals else value

    def reduce_and_reset(self, accelerator, device: torch.device, logged_loss: float | None = None
                         ) -> dict[str, float]:
        """The `balora/*` log entries over all ranks; every rank must call this together.

        The lambdas follow the same schedule on every rank, so they need no reduction.
        `logged_loss` is the Trainer's `loss` for the same steps (for `balora/task_loss`).
        """
        zero = torch.zeros((), device=device)
        totals = torch.stack([
            totals[name].to(device) if name in totals else zero
            for totals in (self._sums, self._counts, self._skipped) for name in TERM_NAMES
        ] + [torch.as_tensor(self._task_sum, dtype=torch.float32).to(device),
             torch.as_tensor(self._total_sum, dtype=torch.float32).to(device)])
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals, reduction="sum")
        values = totals.tolist()  # the one host sync per log
        size = len(TERM_NAMES)
        logs: dict[str, float] = {}
        for index, name in enumerate(TERM_NAMES):
            total, count, skipped = values[index], values[size + index], values[2 * size + index]
            if count > 0:
                logs[f"balora/{name}"] = total / count
            logs[f"balora/lambda_{name}"] = self._lambda_sums[name] / self.micro_batches
            if skipped > 0:
                logs[f"balora/skipped_{name}"] = int(skipped)
                LOG.warning("BA-LoRA: %s term skipped in %d micro-batch(es) since the last log "
                            "(non-finite value or failed SVD)", name, int(skipped))
        task, total = values[-2], values[-1]
        if logged_loss is not None and total != 0:
            logs["balora/task_loss"] = logged_loss * task / total
        self.reset()
        return logs


def _detached(value: torch.Tensor | float) -> torch.Tensor | float:
    return value.detach().float() if isinstance(value, torch.Tensor) else value
