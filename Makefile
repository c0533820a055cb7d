# gradspec developer commands. `make install` bootstraps .venv/ with pinned dependencies.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-lowest demo lint docs bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock requirements-nodeps.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -r requirements-nodeps.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

test: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/python -m pytest -q

# The engine tests against the lowest transformers, tokenizers and safetensors pyproject.toml
# allows (and the lowest huggingface-hub that transformers accepts), installed beside .venv.
LOWEST := .cache/lowest-transformers
lowest = $(shell sed -n 's/^ *"$(1)>=\([0-9.]*\)".*/\1/p' pyproject.toml)
LOWEST_PINS := transformers==$(call lowest,transformers) tokenizers==$(call lowest,tokenizers) \
	safetensors==$(call lowest,safetensors) huggingface-hub==0.34.0 \
	requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1 charset-normalizer==3.5.3
ENGINE_TESTS := tests/test_engine.py tests/test_spectra.py tests/test_resume.py tests/test_validation.py

$(LOWEST)/.installed: pyproject.toml Makefile
	rm -rf $(LOWEST)
	$(BIN)/pip install --quiet --no-deps --target $(LOWEST) $(LOWEST_PINS)
	touch $@

test-lowest: install $(LOWEST)/.installed
	PYTHONPATH=$(CURDIR)/$(LOWEST):$(CURDIR)/src $(BIN)/python -c \
		'import transformers, tokenizers, safetensors; print("lowest:", transformers.__version__, tokenizers.__version__, safetensors.__version__)'
	PYTHONPATH=$(CURDIR)/$(LOWEST):$(CURDIR)/src $(BIN)/python -m pytest -q -m "not slow" $(ENGINE_TESTS)

demo: install
	$(BIN)/python -m gradspec demo

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# The documentation site (docs/, mkdocs.yml) into site/; warnings (a broken link, an
# unreadable docstring) fail the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

bench: install
	$(BIN)/python bench/bench_profile.py

clean:
	rm -rf $(VENV) .cache site
