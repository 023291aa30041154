# tollgate — `make run` builds and runs the proxy (embedded mode); `make test` runs the
# whole suite (installing cmake, redis-server and PostgreSQL when absent).
SHELL := /bin/bash
CARGO ?= cargo
CONFIG ?= config.toml

.PHONY: setup run build test lint fmt bench bench-spend soak clean

setup:
	./scripts/setup.sh

build: setup
	$(CARGO) build --release

run: build
	./target/release/tollgate serve --config $(CONFIG)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test:
	./scripts/setup.sh --test
	# Thread count via the environment: the criterion benches (run once each as smoke
	# tests) do not accept libtest's --test-threads flag. --workspace: the crates under
	# crates/ (token counting, the mock upstream) have their own tests.
	RUST_TEST_THREADS=4 $(CARGO) test --workspace --all-targets

fmt:
	$(CARGO) fmt --all

# The fault-injection soak (tests/soak.rs): two instances on a private Redis and
# PostgreSQL, mixed traffic, a fault every 30 s; prints lost / doubled / phantom /
# overspend / cost / counter checks and fails on any. `make test` runs it for 60 s.
SOAK_SECONDS ?= 600
soak:
	./scripts/setup.sh --test
	SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO) test --test soak -- --nocapture

bench: setup
	./benches/load.sh

# Spend reports over 1,000,000 generated ledger rows in SQLite and a private PostgreSQL
# (SPEND_ROWS to change the count); figures and plans in docs/performance.md.
bench-spend:
	$(CARGO) bench --bench spend

clean:
	$(CARGO) clean
