# sslflow: `make demo` runs the main job end to end, `make test` runs the tests.
# Both create the virtual environment first (Python 3.10+; torch from requirements/constraints.txt).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

.PHONY: demo ui test lint bench bench-cpu clean

$(BIN)/sslflow: pyproject.toml setup.py requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c requirements/constraints.txt -e '.[dev]'
	touch $@

demo: $(BIN)/sslflow            ## ingest the demo set, pretrain, evaluate (a few minutes on 2 CPU cores)
	$(BIN)/sslflow run --no-progress

ui: $(BIN)/sslflow              ## MLflow UI on ./mlflow.db
	$(BIN)/sslflow ui

test: $(BIN)/sslflow            ## the whole test suite
	$(BIN)/ruff check .
	$(BIN)/pytest -q --durations=15

lint: $(BIN)/sslflow
	$(BIN)/ruff check .

bench: $(BIN)/sslflow           ## GPU throughput vs a per-image DataLoader (needs ../shared/datasets)
	$(BIN)/python benchmarks/throughput.py

bench-cpu: $(BIN)/sslflow       ## the same benchmark as a short CPU smoke run
	$(BIN)/python benchmarks/throughput.py --device cpu --quick --batch-size 128 --workers 2

clean:
	rm -rf $(VENV) runs data reports mlflow.db mlartifacts .pytest_cache
