# The README's two commands: `make run` and `make test`. Both create the
# virtualenv (.venv) on first use and refresh it when setup.cfg changes.

VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed
CONFIG ?= etc/appliance.ini

.PHONY: run test check-config clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# compat mode: a default editable install hides the twistd plugin.
	$(VENV)/bin/pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

run: $(STAMP) var/pow-dev.key
	$(VENV)/bin/twistd --nodaemon --pidfile= appliance --config $(CONFIG)

# A random development key for the shipped config's [pow.key:dev].
var/pow-dev.key:
	mkdir -p var
	umask 077 && head -c 48 /dev/urandom | base64 > $@

test: $(STAMP) var/pow-dev.key
	$(VENV)/bin/pytest $(PYTEST_ARGS)

check-config: $(STAMP) var/pow-dev.key
	$(VENV)/bin/appliance check-config $(CONFIG)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
