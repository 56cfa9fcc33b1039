# Two commands do all set-up on a fresh machine with Python 3.11:  make demo  /  make test
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch: plain `torch` would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
EVAL_DATA ?= $(wildcard ../shared/eval-data)

.PHONY: install demo test clean

$(BIN)/recover-lora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/recover-lora

demo: install
	$(BIN)/recover-lora demo $(if $(EVAL_DATA),--eval.data-dir $(EVAL_DATA))

test: install
	$(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf $(VENV) runs .pytest_cache
