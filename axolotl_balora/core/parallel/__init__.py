"""The one place that answers "is this sharded, by which engine, on which rank?" and gathers.

Rule: imports torch (torch.distributed included) only; every other layer asks here
instead of testing `ds_id`, `DTensor` or `dist.is_initialized()` itself.
"""
