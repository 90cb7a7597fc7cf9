"""The layering drawn in docs/architecture.md, checked on the source: imports only go down.

Each module's imports are read with `ast` (module level and inside functions alike), so a
lazy import that reaches up a layer fails here as surely as a top-level one. Above the core,
the Axolotl layer: only `patches/` replaces upstream names, and a patch reaches upstream for
nothing but what it patches.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "axolotl_balora"
CORE = PACKAGE / "core"
PATCHES = PACKAGE / "patches"

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
    """The checker resolves `from ..x import` correctly (else the test above passes vacuously):
    the core's own imports, all relative, reach every layer below `training`."""
    reached = {_part(name) for path in _core_modules() for name in _imports(path)}
    assert {"config", "ops", "parallel", "adapter"} <= reached


def test_no_core_module_is_left_at_the_top_but_config():
    top_level = {path.stem for path in CORE.glob("*.py")} - {"__init__"}
    assert top_level == {"config"}


# -- the Axolotl layer ----------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _axolotl_layer_modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if CORE not in path.parents)


def _patch_modules() -> list[Path]:
    return sorted(path for path in PATCHES.glob("*.py") if path.name != "__init__.py")


def _dotted(node: ast.expr) -> tuple[str | None, list[str]]:
    """`a.b.c` as ("a", ["b", "c"]); (None, []) when it does not start at a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.insert(0, node.attr)
        node = node.value
    return (node.id, parts) if isinstance(node, ast.Name) else (None, [])


def _upstream_assignments(path: Path) -> set[str]:
    """Every `module.name` this file rebinds on a module it imported from another package
    (`module.name = ...`, `setattr(module, "name", ...)`): a monkey-patch of upstream code."""
    tree = ast.parse(path.read_text())
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):  # `import a.b` binds a; `import a.b as c` binds c to a.b
            for alias in node.names:
                bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            bound.update({alias.asname or alias.name: f"{node.module}.{alias.name}" for alias in node.names})
    upstream = {name: module for name, module in bound.items() if not module.startswith("axolotl_balora")}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("setattr", "delattr") and node.args:
            name = node.args[1].value if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) else "<computed>"
            targets = [ast.Attribute(value=node.args[0], attr=name)]
        else:
            continue
        for target in targets:
            root, parts = _dotted(target)
            if root in upstream and parts:
                found.add(".".join([upstream[root], *parts]))
    return found


@pytest.mark.parametrize(
    "path",
    [path for path in (*_core_modules(), *_axolotl_layer_modules()) if PATCHES not in path.parents],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_only_patches_replace_upstream_names(path):
    assert not _upstream_assignments(path), (
        f"{path.relative_to(PACKAGE)} replaces {sorted(_upstream_assignments(path))}: move the patch to "
        f"axolotl_balora/patches/ (one module per patch, with its TARGETS)"
    )


@pytest.mark.parametrize("path", _patch_modules(), ids=lambda p: p.name)
def test_a_patch_replaces_and_imports_nothing_upstream_but_its_targets(path):
    targets = importlib.import_module(_module_name(path)).TARGETS
    patched = {f"{target.module}.{target.attribute}" for target in targets}
    assert _upstream_assignments(path) <= patched, f"{path.name} replaces names it does not list in TARGETS"
    for name in _imports(path):
        if name == "axolotl" or name.startswith("axolotl."):
            assert any(f"{target.module}.".startswith(f"{name}.") for target in targets), (
                f"{path.name} imports {name}, which is none of its TARGETS' modules"
            )


@pytest.mark.parametrize("path", _patch_modules(), ids=lambda p: p.name)
def test_a_patch_imports_only_the_core_from_this_package(path):
    """Patches are leaves the plugin calls: never the plugin, args or another part of the layer."""
    for name in _imports(path):
        if name.startswith("axolotl_balora"):
            assert name in ("axolotl_balora.patches",) or _part(name) is not None, (
                f"{path.name} imports {name}: a patch may import the core (and `patches` itself) only"
            )


def test_the_patches_package_imports_nothing():
    """`axolotl_balora.pth` imports `patches.plugin_names` at every interpreter start."""
    assert _imports(PATCHES / "__init__.py") == []


def test_the_axolotl_layer_checks_read_the_source():
    """The checkers find the patches that exist (else the tests above pass vacuously)."""
    assert _upstream_assignments(PATCHES / "kernel_parameters.py") == {"axolotl.kernels.lora.get_lora_parameters"}
    assert "axolotl.kernels" in _imports(PATCHES / "kernel_parameters.py")
    assert {path.name for path in _axolotl_layer_modules()} >= {"plugin.py", "args.py", "kernel_parameters.py"}
