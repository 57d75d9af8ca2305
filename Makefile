# iotpipe: `make run` (local stack, no Docker) and `make test` are the two commands.
# Both install what a fresh machine lacks: uv, the Python environment, and the mosquitto and
# redis-server binaries from the OS packages (set IOTPIPE_NO_INSTALL=1 to forbid installing).
SHELL := /bin/bash
.DEFAULT_GOAL := help
# Debian installs the broker and Redis in sbin, which a non-root PATH may lack.
export PATH := $(HOME)/.local/bin:$(PATH):/usr/sbin:/usr/local/sbin
UV ?= uv
OS_PACKAGES := mosquitto mosquitto-clients redis-server
# To build the pipeline broker's guard plugin (mosquitto/iotpipe_guard.c) for this machine's mosquitto.
BUILD_OS_PACKAGES := gcc libc6-dev mosquitto-dev libmosquitto-dev libssl-dev
BUILD_PROOF := cc /usr/include/mosquitto_broker.h /usr/include/mosquitto.h /usr/include/openssl/x509.h
TEST_OS_PACKAGES := docker-compose tmux nodejs npm
# Real third parties the suite runs (tests/node/package.json, locked): Node-RED and the AsyncAPI parser;
# and Home Assistant (tests/ha/requirements.txt, pinned), in a virtual environment of its own.
NODE_TOOLS := tests/node
# `make test-compose`: podman as the engine (its Docker API for docker-compose), debootstrap for the
# stand-in base images (tests/compose/engine.py).
COMPOSE_TEST_OS_PACKAGES := podman debootstrap

.PHONY: help deps test-deps venv secrets run test test-compose test-faults fuzz bench bench-bus bench-monitor logs lint asyncapi clean

help:
	@echo "make run            start broker, redis, cloud-sink and the five services locally (Ctrl-C stops)"
	@echo "make test           run the test suite (starts its own mosquitto and redis)"
	@echo "make test-compose   build the images and bring docker-compose.yml up for real under podman: checked"
	@echo "                    from outside, scaled, killed, torn down (about 7 min cold, 5 warm; root; SHORT=1 observes less)"
	@echo "make test-faults    the whole fault battery under load (about 30 min; F4_SECONDS=600 F5_SECONDS=120"
	@echo "                    F6_SECONDS=30 F1_KILLS=5; ARGS=\"-k f4\" for one fault)"
	@echo "make fuzz           coverage-guided fuzzing (atheris) of envelope + payload decoding for FUZZ_SECONDS"
	@echo "                    (default 60); corpus and any crash in var/fuzz/ (ARGS: more libFuzzer flags)"
	@echo "make logs s=NAME    follow one service's log (sensor-reader, preprocessor, cache-writer,"
	@echo "                    cloud-forwarder, monitor, exporter, cloud-sink, broker)"
	@echo "make bench          stepped sustained-load benchmark of the whole pipeline and a naive baseline"
	@echo "                    (about 15 min; table, var/bench/<time>.json and .png; ARGS=\"--help\" for steps,"
	@echo "                    --sustain, --workload high|fleet|both)"
	@echo "make bench-bus      messages/s and CPU per message of one process's MQTT bus (publish, consume)"
	@echo "make bench-monitor  the monitor's anomaly detection on labelled synthetic faults next to a z-score baseline:"
	@echo "                    recall, delay, false alarms, CPU per window (about 25 min; ARGS=--short: < 1 min)"
	@echo "make secrets        generate dev secrets into secrets/ (also done by make run)"
	@echo "make lint           ruff (lint and format) and mypy (strict on shared/, services checked)"
	@echo "make asyncapi       regenerate docs/asyncapi.yaml (and docs/schema/) from the models and topic definitions"

# $(1): packages, $(2): binaries (or absolute paths of files) that prove they are there
define ensure_os_packages
	@missing=""; for bin in $(2); do \
	  case $$bin in /*) test -e $$bin || missing=1 ;; *) command -v $$bin >/dev/null 2>&1 || missing=1 ;; esac; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ -n "$$IOTPIPE_NO_INSTALL" ]; then \
	    echo "error: need $(2) (Debian/Ubuntu: apt-get install $(1)); IOTPIPE_NO_INSTALL forbids installing" >&2; exit 1; \
	  fi; \
	  if ! command -v apt-get >/dev/null 2>&1; then \
	    echo "error: need $(2); install the packages '$(1)' with your OS package manager" >&2; exit 1; \
	  fi; \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO="sudo"; \
	  echo "installing OS packages: $(1)"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(1) >/dev/null \
	    || { echo "error: could not install $(1); install them and retry" >&2; exit 1; }; \
	fi
endef

deps:
	@command -v $(UV) >/dev/null 2>&1 || { echo "installing uv"; python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv; }
	$(call ensure_os_packages,$(OS_PACKAGES),mosquitto mosquitto_sub redis-server redis-cli)
	$(call ensure_os_packages,$(BUILD_OS_PACKAGES),$(BUILD_PROOF))

test-deps: deps
	$(call ensure_os_packages,$(TEST_OS_PACKAGES),docker-compose tmux node npm)
	@# npm ci only when the lock file is newer than the last install (it takes about 40 s).
	@if [ ! $(NODE_TOOLS)/node_modules/.package-lock.json -nt $(NODE_TOOLS)/package-lock.json ]; then \
	  echo "installing the test suite's Node.js tools ($(NODE_TOOLS))"; \
	  npm ci --prefix $(NODE_TOOLS) --no-audit --no-fund --loglevel=error; \
	fi
	@# Home Assistant's own code for the discovery checks, in var/ha-venv (pinned; a no-op once installed).
	UV=$(UV) sh tests/ha/setup.sh

venv: deps
	$(UV) sync --frozen

secrets: venv
	$(UV) run --frozen iotpipe secrets secrets

run: venv
	$(UV) run --frozen iotpipe stack

test: test-deps venv
	$(UV) run --frozen pytest

# The real docker-compose.yml under podman (tests/compose/): needs root (rootful podman, debootstrap).
test-compose: test-deps venv
	@[ "$$(id -u)" -eq 0 ] || { echo "error: make test-compose runs rootful podman and debootstrap: run it as root" >&2; exit 1; }
	$(call ensure_os_packages,$(COMPOSE_TEST_OS_PACKAGES),podman debootstrap)
	IOTPIPE_COMPOSE_TEST=1 IOTPIPE_COMPOSE_SHORT=$(SHORT) $(UV) run --frozen pytest tests/compose -p no:randomly -s -rA $(ARGS)

# The fault battery (tests/faults/): every fault at about 20,000 readings/s, each window counted at
# both sinks. Its fast part also runs in `make test`. Tables are printed and appended to var/faults-report.txt.
F1_KILLS ?= 5
F4_SECONDS ?= 600
F5_SECONDS ?= 120
F6_SECONDS ?= 30
test-faults: test-deps venv
	@mkdir -p var
	IOTPIPE_FAULTS_FULL=1 IOTPIPE_FAULTS_F1_KILLS=$(F1_KILLS) IOTPIPE_FAULTS_F4_SECONDS=$(F4_SECONDS) \
	  IOTPIPE_FAULTS_F5_SECONDS=$(F5_SECONDS) IOTPIPE_FAULTS_F6_SECONDS=$(F6_SECONDS) \
	  IOTPIPE_FAULTS_REPORT=$(CURDIR)/var/faults-report.txt \
	  $(UV) run --frozen pytest tests/faults -m "faults_fast or faults_full" -rA -s $(ARGS)

# Bounded: libFuzzer stops after FUZZ_SECONDS, or at the first failing input, which it saves in
# var/fuzz/crashes/ (replay: uv run python tests/fuzz/envelope_payload.py <file>). The corpus grows
# across runs in var/fuzz/corpus/. The property tests in tests/test_fuzz_*.py run in `make test`.
FUZZ_SECONDS ?= 60
fuzz: venv
	$(UV) run --frozen python tests/fuzz/envelope_payload.py --seconds $(FUZZ_SECONDS) $(ARGS)

# Figures, never assertions: the operator's own hardware. iotpipe.bench says what is measured and how.
bench: deps venv
	$(UV) run --frozen iotpipe bench $(ARGS)

bench-bus: venv
	$(UV) run --frozen python tests/bench/bus.py $(ARGS)

bench-monitor: venv
	$(UV) run --frozen python tests/bench/monitor.py $(ARGS)

logs:
	@test -n "$(s)" || { echo "usage: make logs s=<service>" >&2; exit 2; }
	tail -n 50 -F var/log/$(s).log

lint: venv
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .
	$(UV) run --frozen mypy

# Generated contract documents: never edit them by hand (tests/test_asyncapi.py, tests/test_models.py
# fail when they differ from what the code produces).
asyncapi: venv
	$(UV) run --frozen iotpipe schema
	$(UV) run --frozen iotpipe asyncapi > docs/asyncapi.yaml.tmp && mv docs/asyncapi.yaml.tmp docs/asyncapi.yaml

clean:
	rm -rf var .pytest_cache .ruff_cache
