# sslflow: `make demo` runs the main job end to end, `make test` runs the tests.
# Both create the virtual environment first (Python 3.10+; torch from requirements/constraints.txt).
# A machine without an NVIDIA GPU: `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu`
# installs the CPU build of the same torch/torchvision versions, without the CUDA libraries and triton
# (4.1 GB of the 6.6 GB .venv); it only matters when .venv is created (or after `make clean`).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
TORCH_INDEX ?=
# pytest-xdist workers of `make test` (the service-stack tests share one: tests/conftest.py)
TEST_WORKERS ?= 2

.PHONY: demo ui test test-all lint bench bench-cpu bench-methods clean

$(BIN)/sslflow: pyproject.toml setup.py requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(if $(TORCH_INDEX),$(PIP) install -q -c requirements/constraints.txt --index-url $(TORCH_INDEX) torch torchvision)
	$(PIP) install -q -c requirements/constraints.txt -e '.[dev]'
	touch $@

demo: $(BIN)/sslflow            ## ingest the demo set, pretrain, evaluate (a few minutes on 2 CPU cores)
	mkdir -p data/incoming
	$(BIN)/sslflow run --no-progress

ui: $(BIN)/sslflow              ## MLflow UI on ./mlflow.db
	$(BIN)/sslflow ui

test: $(BIN)/sslflow            ## the whole test suite
	$(BIN)/ruff check .
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=15

test-all: $(BIN)/sslflow        ## the suite plus the extended checks (the full demo job, kill -9 of every method)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=15 -m "extended or not extended"

lint: $(BIN)/sslflow
	$(BIN)/ruff check .

bench: $(BIN)/sslflow           ## GPU throughput vs a per-image DataLoader (needs ../shared/datasets)
	$(BIN)/python benchmarks/throughput.py

bench-cpu: $(BIN)/sslflow       ## the same benchmark as a short CPU smoke run
	$(BIN)/python benchmarks/throughput.py --device cpu --quick --batch-size 128 --workers 2

BENCH_DIR ?= runs/bench-methods
METHODS   ?= all
bench-methods: $(BIN)/sslflow   ## every method on the demo set with its demo profile (CPU; hours on 2 cores)
	$(BIN)/sslflow ingest --source demo --store $(abspath $(BENCH_DIR))/data/store --split train --project $(BENCH_DIR)
	$(BIN)/sslflow ingest --source demo --store $(abspath $(BENCH_DIR))/data/store --split test --project $(BENCH_DIR)
	$(BIN)/sslflow compare --methods $(METHODS) --project $(BENCH_DIR) --run-name demo-methods --no-progress \
	    --report $(abspath $(BENCH_DIR))/report

clean:
	rm -rf $(VENV) runs data reports mlflow.db mlartifacts .pytest_cache
