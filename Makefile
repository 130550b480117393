# gapcast: the README's commands. Both set up .venv themselves; a second run installs nothing.
#   make test   lint + the test suite (starts private Mosquitto brokers; installs Mosquitto when missing, and the
#               servers the operations tests start: Prometheus and RabbitMQ with its MQTT plugin)
# Real users on a GPU box can override the torch pin: make test TORCH_SPEC='torch>=2.2'

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# bench: PyPOTS and PyGrinder, so CI runs `gapcast bench accuracy --quick` and the mask test
EXTRAS ?= train,edge,tools,sink,bench,dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gapcast-installed
SHARED_DATA := $(abspath ../shared/data)
# Point the data loader at ../shared/data when it exists and the user did not choose a folder.
ifeq ($(origin GAPCAST_DATA), undefined)
  ifneq ($(wildcard $(SHARED_DATA)/beijing-multisite),)
    export GAPCAST_DATA := $(SHARED_DATA)
  endif
endif

.PHONY: test lint venv mosquitto test-servers shellcheck clean demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $(STAMP)

mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing Mosquitto with apt-get"; \
		SUDO=$$(test "$$(id -u)" -eq 0 || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq mosquitto >/dev/null; \
	else \
		echo "Mosquitto is missing and apt-get is not available: install the 'mosquitto' broker with your package manager" >&2; \
		exit 1; \
	fi

# The other servers and tools the tests start or run privately (temporary configs, free ports): Prometheus scrapes
# the agent's metrics, RabbitMQ is the second MQTT implementation,
# InfluxDB 1.x is the sink's external target, chromium + chromedriver load the dashboard page headless,
# shellcheck / systemd-analyze check the deployment
# files. Debian/Ubuntu packages, installed when missing; nothing is started or enabled by installing.
TEST_SERVERS := prometheus:prometheus rabbitmq-server:rabbitmq-server influxd:influxdb chromium:chromium chromedriver:chromium-driver
LINT_TOOLS := shellcheck:shellcheck systemd-analyze:systemd
APT_ENSURE = missing=""; for pair in $(1); do bin=$${pair%%:*}; pkg=$${pair\#\#*:}; \
		command -v $$bin >/dev/null 2>&1 || test -x /usr/sbin/$$bin || test -x /usr/bin/$$bin || missing="$$missing $$pkg"; done; \
	if [ -z "$$missing" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing$$missing with apt-get"; \
		SUDO=$$(test "$$(id -u)" -eq 0 || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends $$missing >/dev/null; \
	else \
		echo "missing:$$missing, and apt-get is not available: install them with your package manager" >&2; \
		exit 1; \
	fi

test-servers:
	@$(call APT_ENSURE,$(TEST_SERVERS))

shellcheck:
	@$(call APT_ENSURE,$(LINT_TOOLS))

lint: venv shellcheck
	$(VENV)/bin/ruff check .

test: venv mosquitto test-servers lint
	$(VENV)/bin/pytest -q

# The whole system on real data (train 5 min -> evaluate -> signed bundle -> broker + agent -> replay -> scores).
# More training: make demo DEMO_ARGS='--train-minutes 30'
demo: venv mosquitto
	$(VENV)/bin/gapcast demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
