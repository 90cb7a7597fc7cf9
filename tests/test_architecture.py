"""The layering drawn in docs/architecture.md, checked on the source: imports only go down.

Each module's imports are read with `ast` (module level and inside functions alike), so a
lazy import that reaches up a layer fails here as surely as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "axolotl_balora"
CORE = PACKAGE / "core"

# Layer of each part of the core, and the parts of this package each may import.
ALLOWED = {
    "config": {"config"},
    "ops": {"config", "ops"},
    "parallel": {"parallel"},
    "adapter": {"config", "ops", "parallel", "adapter"},
    "training": {"config", "ops", "parallel", "adapter", "training"},
}
# Third-party packages a layer must not import (the rule that keeps it testable alone).
FORBIDDEN_THIRD_PARTY = {
    "config": {"torch", "peft", "transformers", "axolotl", "deepspeed"},
    "ops": {"peft", "transformers", "axolotl", "deepspeed", "torch.distributed"},
    "parallel": {"peft", "transformers", "axolotl"},
    "adapter": {"axolotl"},
    "training": {"axolotl"},
}


def _layer_of(path: Path) -> str:
    relative = path.relative_to(CORE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _core_modules() -> list[Path]:
    return sorted(path for path in CORE.rglob("*.py") if path.name != "__init__.py" or path.parent != CORE)


def _imports(path: Path) -> list[str]:
    """Absolute dotted names of everything `path` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    if path.name == "__init__.py":
        package = ".".join(path.relative_to(PACKAGE.parent).parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.append(module)
    return names


def _part(name: str) -> str | None:
    """The core layer a dotted name belongs to, None outside the core."""
    parts = name.split(".")
    if parts[:2] != ["axolotl_balora", "core"] or len(parts) < 3:
        return None
    return parts[2]


@pytest.mark.parametrize("path", _core_modules(), ids=lambda p: str(p.relative_to(CORE)))
def test_core_imports_only_go_down(path):
    layer = _layer_of(path)
    assert layer in ALLOWED, f"{path.relative_to(PACKAGE)}: a core module outside every layer of docs/architecture.md"
    for name in _imports(path):
        part = _part(name)
        if name.startswith("axolotl_balora") and part is None:
            pytest.fail(f"{path.relative_to(PACKAGE)} imports {name}: the core never imports the Axolotl layer")
        if part is not None:
            assert part in ALLOWED[layer], f"{path.relative_to(PACKAGE)} ({layer}) imports {name} ({part}): up the drawing"
        for forbidden in FORBIDDEN_THIRD_PARTY[layer]:
            assert name != forbidden and not name.startswith(forbidden + "."), (
                f"{path.relative_to(PACKAGE)} ({layer}) imports {name}"
            )


def test_the_check_reads_relative_imports():
    """The checker resolves `from ..x import` correctly (else the test above passes vacuously)."""
    trainer_imports = _imports(CORE / "training" / "trainer.py")
    assert "axolotl_balora.core.config" in trainer_imports
    assert "axolotl_balora.core.ops.schedules" in trainer_imports
    assert any(_part(name) == "adapter" for name in _imports(CORE / "training" / "trainer.py"))


def test_no_core_module_is_left_at_the_top_but_config():
    top_level = {path.stem for path in CORE.glob("*.py")} - {"__init__"}
    assert top_level == {"config"}
