# Two commands on a fresh machine:  make demo  ·  make test
# Each creates .venv on first use and re-installs only when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
PYTEST_ARGS ?=

.PHONY: demo test install install-dev distill-deps bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The demo distills a student (Ultralytics + torch: the [distill] extra, ~6 GB) and quantizes it ([quantize]).
$(VENV)/.core-installed: pyproject.toml | $(PY)
	$(PIP) install -e ".[quantize,distill]"
	@touch $@

$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PIP) install -e ".[dev,distill]"
	@touch $@ $(VENV)/.core-installed

install: $(VENV)/.core-installed
install-dev: $(VENV)/.dev-installed

demo: install
	$(VENV)/bin/bastion demo

# pytest exits 5 when no test was collected; that is not a failure of the code.
test: install-dev
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

# The model-team extra alone (make test already installs it with the dev tools).
distill-deps: $(VENV)/.dev-installed
	$(PIP) install -e ".[distill,dev]"

bench: install
	$(VENV)/bin/bastion bench detect --images bastion/samples/images --json

clean:
	rm -rf $(VENV) build dist *.egg-info runs .pytest_cache
