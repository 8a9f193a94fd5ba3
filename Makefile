# Two commands on a fresh machine:  make demo  ·  make test
# Each creates .venv on first use and installs from the hash-pinned lock in requirements/ (re-installing only when
# the lock or pyproject.toml changes); `make lock` refreshes the lock, deliberately.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# PYTHONSAFEPATH: `python -m pytest` does not put the repo root on sys.path, so the checkout's bastion/ folder
# never shadows the installed package (tests/conftest.py holds the same line for any other way pytest is started).
# The suite runs on every core and one more (pytest-xdist; PYTEST_JOBS=0 runs it in this process, e.g. to debug
# with pdb): half of a worker's time is spent waiting on the processes, sockets and brokers its tests start, so two
# workers on two cores left half the CPU idle.
PYTEST_JOBS ?= $(shell echo $$(( $$(nproc 2>/dev/null || echo 1) + 1 )))
PYTEST := PYTHONSAFEPATH=1 $(PY) -m pytest -n $(PYTEST_JOBS) --dist worksteal
PYTEST_ARGS ?=
WHEELHOUSE ?= wheelhouse
# pip download's --platform/--python-version for another target (the lock itself was resolved for CPython 3.11 on
# Linux x86_64; see README "Air-gapped units")
WHEELHOUSE_ARGS ?=
# e.g. LOCK_ARGS=--upgrade, or LOCK_ARGS="--upgrade-package numpy"; without it `make lock` keeps every pin that
# still satisfies pyproject.toml
LOCK_ARGS ?=
LOCK_FLAGS := --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	--no-emit-trusted-host --build-deps-for editable --build-deps-for wheel

.PHONY: demo test test-fast lint format-check install install-dev distill-deps lock wheelhouse bench clean chromium

$(PY):
	@echo "make: creating $(VENV) with $(PYTHON) (a few seconds)"
	$(PYTHON) -m venv $(VENV)

# Every package pinned and hash-checked (--require-hashes), then bastion itself without dependencies, built with
# the locked setuptools (no build isolation: nothing is fetched that the lock does not name).
define install_lock
	@echo "make: installing $(1) into $(VENV) — $(2); once, and again only when the lock or pyproject.toml changes"
	$(PIP) install --require-hashes -r $(1)
	$(PIP) install --no-deps --no-build-isolation -e .
endef

# The demo distills a student (Ultralytics + torch: the [distill] extra, ~6 GB) and quantizes it ([quantize]).
$(VENV)/.core-installed: requirements/demo.txt pyproject.toml | $(PY)
	$(call install_lock,requirements/demo.txt,~6 GB with torch and Ultralytics; measured ~6 min on a 2-core VM)
	@touch $@

# dev + distill: everything the demo needs, plus pytest, ruff and pip-tools.
$(VENV)/.dev-installed: requirements/dev.txt pyproject.toml | $(PY)
	$(call install_lock,requirements/dev.txt,~6 GB with torch and Ultralytics; measured ~6 min on a 2-core VM)
	@touch $@ $(VENV)/.core-installed

install: $(VENV)/.core-installed
install-dev: $(VENV)/.dev-installed

demo: install
	@echo "make: bastion demo — distill (pseudo-labels, a 3-epoch student, INT8), sign, detect, serve; measured" \
		"5-7 min on a 2-core VM; a stage line for each step, and training progress lines in a log"
	$(VENV)/bin/bastion demo

# Lint and format check, both run by `make test` and `make test-fast` (pyproject's [tool.ruff]).
lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format-check: install-dev
	$(VENV)/bin/ruff format --check .

# The full suite CI runs. pytest exits 5 when no test was collected; that is not a failure of the code.
test: install-dev lint chromium
	@echo "make: the full suite (slow end-to-end tests included), nproc+1 workers — measured ~8 min on a 2-core VM"
	@$(PYTEST) $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

# The edit loop: no end-to-end (`slow`: the tests tests/slow_tests.txt lists from a measured run, and those marked in
# their files) and no wheel builds; under 2 minutes. scripts/slow_tests.py rewrites the list as the suite grows.
test-fast: install-dev lint
	@$(PYTEST) -m "not slow and not wheel" $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

# Debian's chromium, for the report's browser checks (tests/test_demo_report.py loads the demo report in headless
# Chromium). Installed only when missing, only where apt-get can run (root, or password-less sudo); anywhere else
# this says why and the browser tests skip with the same reason. Debian's mosquitto too, the MQTT broker
# tests/test_sinks.py starts on loopback, and softhsm2, the PKCS#11 token the signing tests use (each skips without it).
chromium:
	@sh scripts/apt_install.sh mosquitto mosquitto "the MQTT sink tests"
	@sh scripts/apt_install.sh softhsm2 softhsm2-util "the PKCS#11 signing tests"
	@command -v chromium-browser >/dev/null 2>&1 || \
		sh scripts/apt_install.sh chromium chromium "the report's browser tests (~300 MB, 1-3 min)"

# The model-team extra alone (make test already installs it with the dev tools).
distill-deps: install-dev

# Re-resolve the three locks from pyproject.toml (network). dev is resolved first; demo and core are constrained
# by it, so the three agree on every version they share.
lock: install-dev
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile $(LOCK_FLAGS) $(LOCK_ARGS) \
		--extra dev --extra distill --extra hsm --extra scale -o requirements/dev.txt pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile $(LOCK_FLAGS) $(LOCK_ARGS) \
		--extra quantize --extra distill -c requirements/dev.txt -o requirements/demo.txt pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile $(LOCK_FLAGS) $(LOCK_ARGS) \
		-c requirements/dev.txt -o requirements/core.txt pyproject.toml

# Everything a field node needs (core: no torch), as wheels in one folder, for units that never see a network:
#   pip install --no-index --find-links wheelhouse bastion
# bastion's own wheel is built from the folder alone (its locked setuptools and wheel), and the folder carries the
# line above (INSTALL) and the lock (requirements.txt, for `bastion doctor --lock`).
wheelhouse: | $(PY)
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(PIP) download --require-hashes --no-deps --only-binary=:all: $(WHEELHOUSE_ARGS) -d $(WHEELHOUSE) \
		-r requirements/core.txt
	$(PIP) wheel --no-deps --no-index --find-links $(WHEELHOUSE) -w $(WHEELHOUSE) .
	cp requirements/core.txt $(WHEELHOUSE)/requirements.txt
	echo "pip install --no-index --find-links $(notdir $(abspath $(WHEELHOUSE))) bastion" > $(WHEELHOUSE)/INSTALL
	@echo "offline install: $$(cat $(WHEELHOUSE)/INSTALL)"

bench: install
	$(VENV)/bin/bastion bench detect --images bastion/samples/images --json

clean:
	rm -rf $(VENV) build dist *.egg-info runs .pytest_cache $(WHEELHOUSE)
