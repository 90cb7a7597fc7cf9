#!/usr/bin/env bash
# The GPU check on a node without network: install the GPU bundle (.whl/, `make gpu-bundle`) into
# a folder of its own and run benchmarks/gpu_check.py from it, within a time budget.
#
#   bash benchmarks/gpu_slot.sh OUT_DIR [gpu_check.py options, e.g. --smoke or --sections cli]
#
# OUT_DIR receives gpu_check.json (written after every section), gpu_check.log and install.log.
# PYTHON: the interpreter (default python3, the image's). BUDGET_S: gpu_check's --budget-s
# (default 420; with the install and the interpreter's start the command ends within about 8.5
# minutes). The bundle holds everything the check needs beyond the image, so pip installs it
# --no-index --no-deps; its folder comes first on PYTHONPATH (the bundle's transformers, peft and
# accelerate shadow the image's; gpu_check.json records each package's version and folder) and
# its bin/ first on PATH (the `axolotl` and `accelerate` commands). PYTHONPATH skips .pth files:
# nothing the check runs needs one (its configs name the plugin by its full path).
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu_slot.sh OUT_DIR [gpu_check.py options]}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
wheels=("$repo"/.whl/*.whl)
test -e "${wheels[0]}" || { echo "[gpu_slot] no wheels in $repo/.whl: run make gpu-bundle first" >&2; exit 1; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
site=$(mktemp -d "${TMPDIR:-/tmp}/balora-gpu-site-XXXXXX")
trap 'rm -rf "$site"' EXIT

started=$SECONDS
# --no-compile: each process writes the bytecode of what it imports, a fraction of the bundle.
# The image's pip settings (some images set a constraint file) are not for a folder of its own.
env -u PIP_CONSTRAINT -u PIP_REQUIRE_VIRTUALENV PIP_CONFIG_FILE=/dev/null \
    "$python" -m pip install --no-index --no-deps --no-compile --target "$site" "${wheels[@]}" >"$out/install.log" 2>&1 \
    || { tail -20 "$out/install.log" >&2; exit 1; }
echo "[gpu_slot] ${#wheels[@]} wheels installed in $((SECONDS - started)) s into $site"

export PATH="$site/bin:$PATH" PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled AXOLOTL_DO_NOT_TRACK=1
status=0
"$python" "$repo/benchmarks/gpu_check.py" --budget-s "${BUDGET_S:-420}" --out "$out/gpu_check.json" "$@" 2>&1 \
    | tee "$out/gpu_check.log" || status=$?
echo "[gpu_slot] exit $status after $((SECONDS - started)) s: $out/gpu_check.json"
exit $status
