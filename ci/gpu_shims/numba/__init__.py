"""Stand-in for numba in the GPU bundle: `numba.njit` leaves the function as it is.

axolotl 0.19 imports numba at module level only to compile its sample-packing bin search
(`axolotl.utils.samplers.multipack`, three `@numba.njit` functions written in plain Python).
Real numba needs llvmlite, a 57 MiB wheel: more than the whole bundle may take. Without the
compiler the same functions run as Python and give the same bins; only the packing's own
speed differs, which no GPU check measures (it packs a few dozen rows before training starts).
No distribution metadata comes with it: `importlib.metadata.version("numba")` still says numba
is not installed.
"""

from __future__ import annotations

from typing import Any, Callable


def njit(function: Callable[..., Any] | None = None, **_options: Any) -> Any:
    """`@njit` and `@njit(cache=True, ...)` alike return the function unchanged."""
    if function is None:
        return lambda inner: inner
    return function

