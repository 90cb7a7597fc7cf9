"""Running sums of the BA-LoRA terms between two training logs, kept on the device.

Reading a term with `.item()` every micro-batch would stall the accelerator once
per term per step; the sums stay on the device instead and are read once per
log, after one reduction over all ranks (so the logged value is the mean over
every rank's micro-batches, as the Trainer's own loss is, not rank 0's alone).
"""

from __future__ import annotations

import torch

from .regularizers import TERM_NAMES, RegularizerTerms
from .schedules import Lambdas


class TermTally:
    """Sums, counts and skips of each term since the last `reduce_and_reset`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.micro_batches = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._counts = dict.fromkeys(TERM_NAMES, 0)
        self._skipped = dict.fromkeys(TERM_NAMES, 0)
        self._lambda_sums = dict.fromkeys(TERM_NAMES, 0.0)

    def add(self, terms: RegularizerTerms, lambdas: Lambdas) -> None:
        """Accumulate one micro-batch's terms (no host sync)."""
        self.micro_batches += 1
        for name in TERM_NAMES:
            if name in terms.values:
                value = terms.values[name].detach().float()
                self._sums[name] = self._sums[name] + value if name in self._sums else value
                self._counts[name] += 1
            self._skipped[name] += terms.skipped.get(name, 0)
            self._lambda_sums[name] += getattr(lambdas, name)

    def reduce_and_reset(self, accelerator, device: torch.device) -> dict[str, float]:
        """The `balora/*` log entries over all ranks; every rank must call this together.

        The lambdas follow the same schedule on every rank, so they need no reduction.
        """
        zero = torch.zeros((), device=device)
        sums = torch.stack([self._sums[name].to(device) if name in self._sums else zero for name in TERM_NAMES])
        counts = torch.tensor(
            [self._counts[name] for name in TERM_NAMES] + [self._skipped[name] for name in TERM_NAMES],
            dtype=sums.dtype, device=device,
        )
        totals = torch.cat([sums, counts])
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
        self.reset()
        return logs
