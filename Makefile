PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench clean

# torch goes in first, pinned: the local CPU wheel satisfies torch>=2.4, so the editable install
# below never pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/edgetune demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n 2

bench: $(VENV)/.installed
	$(BIN)/python -m bench

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis runs
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
