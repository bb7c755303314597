# Two commands set everything up on a fresh machine:
#   make demo   -> creates .venv, installs healthfm, runs `healthfm demo` on the bundled data
#   make test   -> creates .venv, installs healthfm + test tools, builds the docs site
#                  (mkdocs --strict), runs ruff, the import contracts (lint-imports,
#                  pyproject.toml) and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# The local CPU build of torch; a bare `torch` would resolve to a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
DEMO_OUT ?= demo_out

.PHONY: demo test docs lint format bench env clean browser constraints

# constraints.txt pins every dependency to the versions CI tested (the package's own
# requirements stay ranges): a fresh clone installs the stack the suite passed on.
$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

# Rewrite constraints.txt from the current environment (after changing dependencies).
constraints: env
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v -E '^(torch|py-spy)=='; } > constraints.tmp && mv constraints.tmp constraints.txt

env: $(VENV)/.installed

demo: env
	$(VENV)/bin/healthfm demo --out $(DEMO_OUT)

# The report's browser test renders pages in headless Chromium (Debian's `chromium`):
# installed here when missing and possible; otherwise the test says why it skips.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null; } \
	  || echo "warning: chromium not installed; the report's browser test will skip" >&2

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a warning (a broken link or
# anchor, a docstring the API reference cannot read) fails the build. tests/test_docs.py checks
# the built pages' links and opens each in headless Chromium.
# No --quiet: it silences the warnings that --strict counts, and a broken build passes.
docs: env
	PYTHONPATH=src NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

test: env browser docs
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	PYTHONPATH=src $(VENV)/bin/lint-imports --no-logo
	$(PY) -m pytest

format: env
	$(VENV)/bin/ruff format src tests benchmarks scripts
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts

# Speed and memory benchmarks (minutes each; they print ratios measured in one run).
bench: env
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/bench_tokenizer.py
	$(PY) benchmarks/bench_backbone.py --threads 1
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/train_memory.py --compare-release
	$(PY) benchmarks/bench_singlecell.py
	$(PY) benchmarks/bench_ehr.py
	$(PY) benchmarks/bench_pathology.py
	$(PY) benchmarks/bench_finetune.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) site
