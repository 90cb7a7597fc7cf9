"""The test-only CPU rewrite of accelerate / transformers / axolotl (tests/cpu_distributed) applies
to every supported axolotl, and fails loudly when a line it rewrites changes upstream.

The installed versions are read from site-packages; axolotl 0.19, 0.20 and 0.21 (whichever is
not installed) from their wheels, fetched from the package index once per session.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cpu_distributed.sitecustomize import PATCHES, patched_source

SUPPORTED_AXOLOTL = ("0.19.0", "0.20.0", "0.21.0")
INSTALLED_AXOLOTL = importlib.metadata.version("axolotl")


def _installed_source(module: str) -> str:
    return Path(importlib.util.find_spec(module).origin).read_text()


@pytest.fixture(scope="session")
def axolotl_wheels(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("axolotl-wheels")
    wheels = {}
    for version in SUPPORTED_AXOLOTL:
        if version == INSTALLED_AXOLOTL:
            continue
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.12", f"axolotl=={version}", "-d", str(folder)],
            check=True, timeout=300,
        )
        wheels[version] = folder / f"axolotl-{version}-py3-none-any.whl"
    return wheels


def _wheel_source(wheel: Path, module: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(module.replace(".", "/") + ".py").decode()


@pytest.mark.parametrize("module", sorted(PATCHES))
def test_every_rewrite_applies_to_the_installed_packages(module):
    source = _installed_source(module)
    patched = patched_source(module, source)
    for old, new, _ in PATCHES[module]:
        assert new in patched
    assert patched != source


@pytest.mark.slow
@pytest.mark.parametrize("version", [v for v in SUPPORTED_AXOLOTL if v != INSTALLED_AXOLOTL])
def test_every_axolotl_rewrite_applies_to_each_supported_version(axolotl_wheels, version):
    minor = ".".join(version.split(".")[:2])
    for module in (name for name in PATCHES if name.startswith("axolotl.")):
        patched_source(module, _wheel_source(axolotl_wheels[version], module), minor)


@pytest.mark.parametrize("module", sorted(PATCHES))
def test_a_changed_upstream_line_fails_loudly(module):
    old = PATCHES[module][0][0]
    changed = _installed_source(module).replace(old, old[::-1])  # the line as upstream might reword it
    with pytest.raises(RuntimeError, match=f"cpu_distributed patch: .* in {module}, expected"):
        patched_source(module, changed)


def test_an_unknown_axolotl_version_fails_loudly():
    with pytest.raises(RuntimeError, match="expected -1"):
        patched_source("axolotl.monkeypatch.accelerate.fsdp2", _installed_source("axolotl.monkeypatch.accelerate.fsdp2"),
                       "9.99")
