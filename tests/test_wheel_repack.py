"""ci/wheel_repack.py: the GPU bundle's re-packed wheels install with pip, without what was left out."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ci"))

from wheel_repack import repack  # noqa: E402

FILES = {"demo/__init__.py": "VALUE = 3\n", "demo/big.so": "x" * 5000, "demo/tests/test_demo.py": "pass\n"}


def make_wheel(folder: Path) -> Path:
    """A deflated pure-Python wheel of a package `demo` with a library and tests it never loads."""
    wheel = folder / "demo-1.0-py3-none-any.whl"
    info = "demo-1.0.dist-info"
    metadata = {f"{info}/METADATA": "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
                f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    members = {**FILES, **metadata}
    record = "".join(f"{name},,\n" for name in members) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for name, text in {**members, f"{info}/RECORD": record}.items():
            out.writestr(name, text)
    return wheel


def test_repacked_wheel_is_lzma_without_the_dropped_files_and_pip_installs_it(tmp_path):
    source = make_wheel(tmp_path)
    target = tmp_path / "out" / source.name
    dropped = repack(source, target, ("demo/*.so", "demo/tests/*"))
    assert dropped == ["demo/big.so", "demo/tests/test_demo.py"]
    with zipfile.ZipFile(target) as wheel:
        assert {info.compress_type for info in wheel.infolist()} == {zipfile.ZIP_LZMA}
        assert "demo/big.so" not in wheel.namelist()
        record = wheel.read("demo-1.0.dist-info/RECORD").decode()
    assert "demo/big.so" not in record and "demo/__init__.py" in record
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(site), str(target)], check=True)
    assert (site / "demo" / "__init__.py").read_text() == FILES["demo/__init__.py"]
    assert not (site / "demo" / "big.so").exists() and not (site / "demo" / "tests").exists()


def test_a_drop_rule_that_matches_nothing_stops_the_build(tmp_path):
    with pytest.raises(ValueError, match="nothing matches"):
        repack(make_wheel(tmp_path), tmp_path / "out.whl", ("demo/gone/*",))
