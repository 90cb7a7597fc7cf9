"""The upstream names `axolotl_balora/patches/` replaces are still there on the installed axolotl.

Each patch names its targets (`TARGETS`): the module, the function and the parameters it relies
on. An axolotl release that moves or reshapes one fails here, naming the patch, instead of a
training run silently going without it (the patches fall back to doing nothing when their target
is missing).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from importlib.metadata import version
from types import ModuleType

import pytest

from axolotl_balora import patches

PATCHES = [importlib.import_module(f"{patches.__name__}.{info.name}") for info in pkgutil.iter_modules(patches.__path__)]
CASES = [(patch, target) for patch in PATCHES for target in patch.TARGETS]
AXOLOTL = version("axolotl")


def _minor(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def _case_id(case: object) -> str:
    return case.__name__.rsplit(".", 1)[-1] if isinstance(case, ModuleType) else repr(case)


def _skip_before(target: patches.Target) -> None:
    if _minor(AXOLOTL) < _minor(target.since):
        pytest.skip(f"{target!r} is new in axolotl {target.since} (installed: {AXOLOTL})")


def test_the_installed_axolotl_is_in_the_range_the_patches_were_written_for():
    first, last = patches.AXOLOTL_VERSIONS
    assert _minor(first) <= _minor(AXOLOTL) <= _minor(last), (
        f"axolotl {AXOLOTL}: the patches in axolotl_balora/patches/ were written for {first} to {last}; "
        f"check each patch's TARGETS and its reasons against {AXOLOTL}, then widen AXOLOTL_VERSIONS"
    )


def test_there_are_patches_to_check():
    """The discovery above found the package's modules (else the tests below check nothing)."""
    assert {"plugin_names", "kernel_parameters", "fsdp2_adapter_save"} <= {_case_id(p) for p in PATCHES}


@pytest.mark.parametrize(("patch", "target"), CASES, ids=_case_id)
def test_each_patched_function_is_where_its_patch_expects_it(patch, target):
    _skip_before(target)
    where = f"{patch.__name__} patches {target!r} (axolotl {AXOLOTL})"
    module = importlib.import_module(target.module)
    function = getattr(module, target.attribute, None)
    assert callable(function), f"{where}, which this axolotl no longer has: find where it moved"
    upstream = getattr(function, "balora_original", function)  # signature() follows __wrapped__
    parameters = tuple(inspect.signature(upstream).parameters)
    assert parameters == target.parameters, (
        f"{where}, whose parameters are now {parameters}, not {target.parameters}: check the patch"
    )


@pytest.mark.parametrize(("patch", "target"), CASES, ids=_case_id)
def test_install_replaces_each_target_once_and_keeps_upstreams_function(patch, target, monkeypatch):
    _skip_before(target)
    module = importlib.import_module(target.module)
    monkeypatch.setattr(module, target.attribute, getattr(module, target.attribute))  # restored after
    patch.install()
    installed = getattr(module, target.attribute)
    patch.install()
    assert getattr(module, target.attribute) is installed, f"{patch.__name__}.install() wrapped twice"
    upstream = getattr(installed, "balora_original", None) or getattr(installed, "__wrapped__", None)
    assert upstream is not None and upstream is not installed, f"{patch.__name__} did not replace {target!r}"
