# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv inside the checkout and install what they need (CUDA torch runs on CPU).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sglang-er-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,eval,realmodel]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m sglang_er.demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -ra --durations=25 tests

bench: $(STAMP)
	$(PY) -m eval.bench_startup

clean:
	rm -rf $(VENV) build *.egg-info
