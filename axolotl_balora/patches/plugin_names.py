"""Patch of axolotl's plugin loader (`axolotl.integrations.base`, axolotl 0.19-0.21): let
`plugins: [axolotl_balora]` (the package's own name) load the plugin on every axolotl.

Axolotl 0.19-0.21 split a configured plugin name at its last dot (`load_plugin`), so the bare
package name fails with a ValueError before any code of ours runs. The only code that runs
earlier is interpreter startup: the wheel installs `axolotl_balora.pth`, whose one line imports
this module. It adds nothing but a watcher for `axolotl.integrations.base` (no torch, no
axolotl import); when axolotl itself imports that module, the watcher wraps its name handling so
that the spellings below mean `axolotl_balora.BALoRAPlugin`. Any other name is passed through
untouched. Why this and not a fork of axolotl's loader: docs/compatibility.md.
"""

from __future__ import annotations

import sys

from . import Target

TYPE_CHECKING = False  # not typing's: imported at every interpreter start, this loads only `sys`
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

PLUGIN_NAME = "axolotl_balora.BALoRAPlugin"
# The bare package name, and the class's defining module (which axolotl 0.21 would otherwise
# register a second time beside the `axolotl.plugins` entry point, failing validation).
ALIASES = frozenset({"axolotl_balora", "axolotl_balora.plugin.BALoRAPlugin"})
WATCHED_MODULE = "axolotl.integrations.base"
# 0.19 / 0.20 register a configured name through `load_plugin` and key the plugin by the name as
# written, so only the loading needs the alias. 0.21 first normalizes configured names and skips
# those already registered from entry points: mapping the alias there makes it the entry point's
# plugin instead of a second instance of the same class.
TARGETS = (
    Target(WATCHED_MODULE, "load_plugin", ("plugin_name",)),
    Target(WATCHED_MODULE, "normalize_plugin_name", ("target",), since="0.21"),
)


def canonical_plugin_name(name: str) -> str:
    """`axolotl_balora.BALoRAPlugin` for any alias of this plugin, else `name` unchanged."""
    if name in ALIASES:  # logged by BALoRAPlugin.register, once axolotl's log handlers are set
        return PLUGIN_NAME
    return name


def _accepting_aliases(function: Callable[[str], object]) -> Callable[[str], object]:
    import functools

    @functools.wraps(function)
    def wrapped(name: str) -> object:
        return function(canonical_plugin_name(name))

    return wrapped


def accept_plugin_aliases(base: ModuleType) -> None:
    """Wrap each of `TARGETS` that this axolotl has, once."""
    for target in TARGETS:
        function = getattr(base, target.attribute, None)
        if callable(function) and not hasattr(function, "__wrapped__"):
            setattr(base, target.attribute, _accepting_aliases(function))


class _PatchAfterImport:
    """Finds nothing itself: lets the normal finders locate `WATCHED_MODULE`, then patches it
    right after it executes (and removes itself, so every later import is untouched)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        """A `sys.meta_path` finder (duck-typed: importing importlib.abc costs startup time)."""
        if fullname != WATCHED_MODULE:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            accept_plugin_aliases(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Called by `axolotl_balora.pth` at startup; safe to call again."""
    if WATCHED_MODULE in sys.modules:
        accept_plugin_aliases(sys.modules[WATCHED_MODULE])
    elif not any(isinstance(finder, _PatchAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())
