# The two commands a newcomer runs: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False

# elsewhere than our machines (which provide the CPU wheel), pip's default torch is the CUDA build:
# make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: install demo test lint bench train-default ablation app clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e '.[test,dev,app]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ctflow generate --report-file examples/report.txt --slices 96 --out out/demo.nii.gz --seed 0 --overwrite
	@echo "wrote out/demo.nii.gz, out/demo.png and out/demo.json"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	@for f in $(filter-out benchmarks/common.py benchmarks/ablation.py,$(wildcard benchmarks/*.py)); do \
		echo "== $$f"; $(BIN)/python $$f || exit 1; done

train-default: $(STAMP)
	$(BIN)/python -m ctflow.train.default --work runs/default --install --result make

ablation: $(STAMP)
	$(BIN)/python benchmarks/ablation.py --work runs/default --out runs/ablation

app: $(STAMP)
	$(BIN)/ctflow app

clean:
	rm -rf out runs .pytest_cache
