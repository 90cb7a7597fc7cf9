"""Pure torch math: the reference terms, the fused chunked loss, the schedules, the
classification terms and the per-step evaluation of a term that may be faulty.

Rule: imports torch and `..config` only (no peft, no transformers, no torch.distributed,
no other core layer), so every function here is testable on plain tensors.
"""
