"""Build `.whl/`, the wheels a stock CUDA PyTorch image lacks to run benchmarks/gpu_check.py.

    python ci/gpu_bundle.py            # make gpu-bundle: writes .whl/

GPU nodes have no network, so everything the check imports beyond the image (Python 3.12,
x86-64; torch 2.11, transformers, accelerate, peft, safetensors, tokenizers, numpy, pyyaml,
triton, pytest: ci/constraints-gpu-image.txt) travels with the job, and the job may carry
64 MiB with the repository. The wheels are the pins of ci/gpu-bundle.txt for CPython 3.12 on
manylinux x86-64 (a pure-Python package PyPI has only as an sdist is built into a wheel), this
package's own wheel and ci/gpu_shims; each is re-packed with LZMA, some without files the
check never loads (`DROP`, ci/wheel_repack.py). Downloads are kept in .cache/gpu-bundle/ and a
re-packed wheel is reused while it is newer than its source and this script, so a second run
only rebuilds the two wheels built here. Exits 1 when the bundle and the repository exceed `BUDGET_MIB`.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from wheel_repack import repack

REPO = Path(__file__).resolve().parents[1]
PINS = REPO / "ci" / "gpu-bundle.txt"
SHIMS = REPO / "ci" / "gpu_shims"
DOWNLOADS = REPO / ".cache" / "gpu-bundle"
BUDGET_MIB = 64
# What the wheels must install on: CPython 3.12, glibc x86-64 (the image's). pip does not widen
# a manylinux tag to the older ones by itself, so every glibc level is named.
TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
          "--abi", "cp312", "--abi", "abi3", "--abi", "none",
          *(arg for tag in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_24", "manylinux_2_17",
                            "manylinux2014", "manylinux_2_5", "manylinux1")
            for arg in ("--platform", f"{tag}_x86_64"))]
# Files left out of a wheel (globs on its member names), each never loaded by the GPU check.
DROP: dict[str, tuple[str, ...]] = {
    # Arrow Flight (RPC) and the S3 filesystem: optional parts pyarrow imports only on request
    # (pyarrow.fs records S3 as not built); its C++ headers and sources, and its own tests.
    # libarrow_python is shipped three times under its three names; the soname one is loaded.
    "pyarrow": ("pyarrow/libarrow_flight.so*", "pyarrow/libarrow_python_flight.so*", "pyarrow/_flight.*.so",
                "pyarrow/libarrow_s3.so*", "pyarrow/_s3fs.*.so", "pyarrow/include/*", "pyarrow/src/*",
                "pyarrow/tests/*", "pyarrow/_pyarrow_cpp_tests.*.so", "pyarrow/libarrow_python.so",
                "pyarrow/libarrow_python.so.*.*", "pyarrow/libarrow_python_parquet_encryption.so",
                "pyarrow/libarrow_python_parquet_encryption.so.*.*"),
    "pandas": ("pandas/tests/*",),
    # Pillow's AVIF, WebP and font support (optional plugins, loaded on first use); axolotl only
    # imports PIL.Image for its resampling names.
    "pillow": ("PIL/_avif.*.so", "pillow.libs/libavif-*", "PIL/_webp.*.so", "pillow.libs/libwebp*-*",
               "pillow.libs/libsharpyuv-*", "PIL/_imagingft.*.so", "pillow.libs/libfreetype-*",
               "pillow.libs/libharfbuzz-*", "pillow.libs/libpng16-*", "pillow.libs/libbrotli*-*"),
    # bitsandbytes picks its library by torch's CUDA version: the image's torch 2.11 is CUDA 13.0.
    # The builds for other CUDA versions, ROCm and XPU are left out.
    "bitsandbytes": ("bitsandbytes/libbitsandbytes_cuda1[12]*.so", "bitsandbytes/libbitsandbytes_cuda13[1-9].so",
                     "bitsandbytes/libbitsandbytes_rocm*.so", "bitsandbytes/libbitsandbytes_xpu*.so"),
    # wandb's service binaries start only with a W&B run, which the GPU check never configures
    # (axolotl imports wandb at module level either way).
    "wandb": ("wandb/bin/*",),
}


def normalized(name: str) -> str:
    """A project name as wheel file names spell it (PEP 427 / 503)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def read_pins(path: Path) -> list[tuple[str, str]]:
    """(name, version) of every `name==version` line; comments and blank lines skipped."""
    pins = []
    for line in path.read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            name, _, version = requirement.partition("==")
            if not version:
                raise ValueError(f"{path.name}: '{requirement}' is not pinned with ==")
            pins.append((name.strip(), version.strip()))
    return pins


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True,
                   stdout=subprocess.DEVNULL)


def fetch(name: str, version: str) -> Path:
    """The wheel of name==version in DOWNLOADS: PyPI's for the target, else built from its sdist
    (pure Python only: a compiled one would be built for this machine, not the image)."""
    prefix = f"{normalized(name)}-{version}-"
    cached = [path for path in DOWNLOADS.glob("*.whl") if path.name.lower().startswith(prefix)]
    if cached:
        return cached[0]
    with tempfile.TemporaryDirectory() as folder:
        try:
            pip("download", "--quiet", "--no-deps", *TARGET, "--dest", folder, f"{name}=={version}")
        except subprocess.CalledProcessError:
            pip("wheel", "--quiet", "--no-deps", "--no-binary", name, "--wheel-dir", folder, f"{name}=={version}")
        (built,) = Path(folder).glob("*.whl")
        if "-none-any.whl" not in built.name and "manylinux" not in built.name:
            raise RuntimeError(f"{built.name}: no wheel for the image's platform, and this one is not pure Python")
        DOWNLOADS.mkdir(parents=True, exist_ok=True)
        return Path(built.replace(DOWNLOADS / built.name))


def build_local(project: Path, folder: Path) -> Path:
    """A fresh wheel of a project in this repository (this package, the shims), in `folder`."""
    pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(folder), str(project))
    (wheel,) = folder.glob("*.whl")
    return wheel


def repository_bytes() -> int:
    """What the job carries of the repository: the files git tracks or does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    return sum((REPO / name).stat().st_size for name in listed if name and (REPO / name).is_file())


def main() -> None:
    bundle = REPO / ".whl"
    newest_rule = max(Path(__file__).stat().st_mtime, (REPO / "ci" / "wheel_repack.py").stat().st_mtime)
    bundle.mkdir(exist_ok=True)
    left_out: dict[str, int] = {}  # wheel name -> files left out (re-packed now), or -1 (reused)
    with tempfile.TemporaryDirectory() as local, ProcessPoolExecutor() as pool:
        sources = [fetch(name, version) for name, version in read_pins(PINS)]
        sources += [build_local(project, Path(local) / project.name) for project in (REPO, SHIMS)]
        jobs = {}
        # Largest first: LZMA takes most of a fresh build's time, one wheel per core.
        for source in sorted(sources, key=lambda path: -path.stat().st_size):
            target = bundle / source.name
            if target.exists() and target.stat().st_mtime >= max(source.stat().st_mtime, newest_rule):
                left_out[target.name] = -1
            else:
                jobs[target.name] = pool.submit(repack, source, target, DROP.get(source.name.split("-")[0].lower(), ()))
        left_out.update({name: len(job.result()) for name, job in jobs.items()})
    for stale in {path.name for path in bundle.glob("*.whl")} - left_out.keys():
        (bundle / stale).unlink()
    sizes = {name: (bundle / name).stat().st_size for name in left_out}
    for name, size in sorted(sizes.items(), key=lambda item: -item[1]):
        note = "reused" if left_out[name] < 0 else f"re-packed, {left_out[name]} files left out"
        print(f"{size / 2**20:7.2f} MiB  {name}  ({note})")
    wheels, repo = sum(sizes.values()), repository_bytes()
    total = (wheels + repo) / 2**20
    print(f"[gpu-bundle] {len(sizes)} wheels, {wheels / 2**20:.1f} MiB in .whl/; with the repository "
          f"({repo / 2**20:.1f} MiB): {total:.1f} MiB of {BUDGET_MIB}")
    if total > BUDGET_MIB:
        sys.exit(f"[gpu-bundle] over the {BUDGET_MIB} MiB a GPU job may carry")


if __name__ == "__main__":
    main()
