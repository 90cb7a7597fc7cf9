"""The GPU bundle does what a GPU node needs: checked on the image's stand-in on CPU.

`make gpu-bundle-check` runs this file (CI: .ci/run, after `make test`); its name keeps it out
of `make test`'s collection, since it builds a bundle and runs the slot command, a few minutes.
The make target builds .venv-gpu-image, the stand-in for the stock CUDA PyTorch image (Python
3.12, PyPI's torch 2.11.0 with its CUDA libraries, which import and run on a CPU, transformers
5.17.0, accelerate 1.15.0 and the rest of ci/constraints-gpu-image.txt; no axolotl, datasets,
trl, bitsandbytes or pydantic), and names its interpreter in GPU_IMAGE_PYTHON. This file builds
(or reuses) .whl/ and runs the documented slot command, benchmarks/gpu_slot.sh, with --smoke:
pip install --no-index --no-deps --target, then every section of gpu_check.py from the bundle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ci"))
from gpu_bundle import BUDGET_MIB, repository_bytes  # noqa: E402

IMAGE_PYTHON = os.environ.get("GPU_IMAGE_PYTHON", "")
# Pinned by the image (ci/constraints-gpu-image.txt), and what the bundle must bring instead.
IMAGE_PINS = {"torch": "2.11.0", "transformers": "5.17.0", "accelerate": "1.15.0"}
BUNDLED = {"axolotl": "0.19.0", "transformers": "5.16.1", "peft": "0.20.0", "accelerate": "1.13.0",
           "trl": "1.9.0", "datasets": "4.8.4", "pydantic": "2.12.5", "axolotl-balora": "0.1.0"}
NOT_IN_IMAGE = ("axolotl", "datasets", "trl", "bitsandbytes", "pydantic", "annotated-types", "typing-inspection",
                "flash-attn", "numba")


def bare_env(**extra: str) -> dict[str, str]:
    """This environment without the test session's PYTHONPATH, start-up helpers and venv (as on
    a bare node), plus `extra`."""
    kept = {name: value for name, value in os.environ.items()
            if not name.startswith(("PYTHON", "BALORA_", "VIRTUAL_ENV"))}
    return {**kept, **extra}


def image_versions() -> dict[str, str]:
    """name -> version of what the stand-in has installed (its own site-packages only)."""
    listed = subprocess.run([IMAGE_PYTHON, "-m", "pip", "list", "--format=json"], check=True,
                            capture_output=True, text=True, env=bare_env()).stdout
    return {row["name"].lower(): row["version"] for row in json.loads(listed)}


@pytest.fixture(scope="module")
def bundle() -> Path:
    subprocess.run([sys.executable, str(REPO / "ci" / "gpu_bundle.py")], check=True, env=bare_env())
    return REPO / ".whl"


@pytest.fixture(scope="module")
def slot_run(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    """benchmarks/gpu_slot.sh OUT --smoke with the stand-in's interpreter, the stand-in's bin/ on
    PATH as the image's is, and a budget with room for 2 shared cores (the GPU default is 420 s)."""
    assert IMAGE_PYTHON, "GPU_IMAGE_PYTHON names the image's stand-in: run this file with make gpu-bundle-check"
    out = tmp_path_factory.mktemp("gpu-slot")
    env = bare_env(PYTHON=IMAGE_PYTHON, PATH=os.pathsep.join([str(Path(IMAGE_PYTHON).parent), "/usr/bin", "/bin"]),
                   BUDGET_S="900")
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_slot.sh"), str(out), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=1500)
    return done, json.loads((out / "gpu_check.json").read_text())


def test_bundle_fits_what_a_gpu_job_carries(bundle: Path):
    wheels = sorted(bundle.glob("*.whl"))
    total_mib = (sum(wheel.stat().st_size for wheel in wheels) + repository_bytes()) / 2**20
    assert total_mib <= BUDGET_MIB, f"{total_mib:.1f} MiB"
    names = {wheel.name.split("-")[0].lower() for wheel in wheels}
    assert {"axolotl", "axolotl_balora", "transformers", "pyarrow", "balora_gpu_shims"} <= names
    assert not names & {"torch", "triton", "numba", "llvmlite"}, "the image's, or too large: never bundled"


def test_stand_in_holds_the_image_packages_only():
    assert IMAGE_PYTHON, "GPU_IMAGE_PYTHON names the image's stand-in: run this file with make gpu-bundle-check"
    versions = image_versions()
    assert {name: versions.get(name) for name in IMAGE_PINS} == IMAGE_PINS
    assert not set(NOT_IN_IMAGE) & versions.keys()


def test_slot_command_runs_every_section_from_the_bundle(slot_run):
    done, report = slot_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    sections = report["sections"]
    assert sections.keys() == {"fused_memory", "init_time", "cli"}
    assert all(section["ok"] for section in sections.values()), sections
    assert sections["cli"]["summary"].keys() == {"lora", "balora"} and sections["cli"]["attn"] == "sdpa"
    assert sections["fused_memory"]["fused"]["loss"] == pytest.approx(sections["fused_memory"]["plain"]["loss"],
                                                                      rel=1e-5)


def test_the_check_ran_on_the_image_torch_and_the_bundled_stack(slot_run):
    packages = slot_run[1]["packages"]
    bundle_site = packages["axolotl"]["location"]
    assert packages["torch"]["version"] == IMAGE_PINS["torch"]
    assert Path(packages["torch"]["location"]).is_relative_to(Path(IMAGE_PYTHON).parents[1])
    for name, version in BUNDLED.items():
        assert packages[name] == {"version": version, "location": bundle_site}, name
    # numba's stand-in (ci/gpu_shims) has no metadata; flash-attn is not bundled (sdpa instead)
    assert packages["numba"] == {"version": None, "location": bundle_site} and packages["flash-attn"] is None
