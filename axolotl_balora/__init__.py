"""BA-LoRA for Axolotl and plain transformers.

`axolotl_balora.BALoRAPlugin` is imported lazily so that the core
(`axolotl_balora.core`) works where Axolotl is not installed.
"""

__version__ = "0.1.0"
__all__ = ["BALoRAPlugin", "__version__"]


def __getattr__(name: str) -> object:  # no `typing` import: this package loads at startup
    if name == "BALoRAPlugin":
        from .plugin import BALoRAPlugin

        return BALoRAPlugin
    raise AttributeError(f"module 'axolotl_balora' has no attribute {name!r}")
