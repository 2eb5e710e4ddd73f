# Two commands from a fresh clone: `make test` and `make demo`. Each sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines pin the CPU wheel; GPU users: `make setup TORCH_PIN=` after installing their own torch in .venv.
TORCH_PIN ?= torch==2.13.0
# The reference implementation, used as a differential-test oracle and benchmark peer (imports without its deps).
REFERENCE ?= nemo-automodel==0.7.0

.PHONY: setup test test-fast demo bench bench-smoke clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_PIN)" ]; then \
		$(PY) -m pip install -q "$(TORCH_PIN)" && echo "$(TORCH_PIN)" > $(VENV)/torch-constraint.txt; \
	else $(PY) -c "import torch" && : > $(VENV)/torch-constraint.txt; fi
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps "$(REFERENCE)" || echo "reference $(REFERENCE) not installed: its differential tests will skip"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not multiprocess"

demo: setup
	$(VENV)/bin/lightning-automodel fit --config configs/tiny-llama-cpu.yaml

bench: setup
	$(PY) -m benchmarks.run

bench-smoke: setup
	$(PY) -m benchmarks.run --smoke

clean:
	rm -rf $(VENV) .pytest_cache lightning_logs
