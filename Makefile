# Two commands do all the set-up on a fresh machine: `make reproduce` and `make test`
# (`make docs` builds the documentation site the same way).
# Each creates .venv when missing and installs the package with its dependencies.
# torch==2.13.0 is installed first, and only where torch is not importable: that pins
# the CPU build that lies on disk on our machines instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pmpsolve-installed

.PHONY: install reproduce test docs gallery bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test,docs]'
	touch $(STAMP)

reproduce: $(STAMP)
	$(PY) -m pmpsolve reproduce --resume

# Two pytest workers, one thread each (tests/conftest.py), a whole test file per worker (module fixtures
# such as the distributed spawn run once); TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The documentation site (mkdocs.yml) into site/, not committed; --strict: a broken link, a page
# missing from the navigation or a reference to a missing docstring fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# The gallery's pages and figures (docs/gallery/), each made by its own script; a few minutes.
gallery: $(STAMP)
	$(PY) scripts/gallery.py

# The benchmarks of docs/benchmarks.md (about 45 minutes on 2 cores); CasADi comes with the extra.
# They write results/bench/; scripts/report.py then rewrites docs/benchmarks.md from docs/figures/*.json
# (copy a new measurement there first: see docs/benchmarks.md, "Running them").
bench: $(STAMP)
	$(PY) -m pip install -e '.[test,bench]'
	$(PY) scripts/bench_control.py
	$(PY) scripts/bench_sine.py --no-progress
	$(PY) scripts/bench_scaling.py
	$(PY) scripts/bench_maximisers.py
	$(PY) scripts/bench_networks.py
	$(PY) scripts/bench_compile.py
	$(PY) scripts/bench_iteration_parts.py
	$(PY) scripts/bench_iterations.py
	$(PY) scripts/bench_shooting.py
	$(PY) scripts/bench_gpu.py
	$(PY) scripts/report.py

clean:
	rm -rf results .pytest_cache build site *.egg-info
