# The README's two commands: `make run` and `make test`.
CARGO ?= cargo

.PHONY: run test bench lint deps release clean

deps:
	@./scripts/install-deps.sh

release: deps
	$(CARGO) build --release --bin tollgate --example demo_upstream

## Build and start the gateway on conf/tollgate.yaml with the demo upstream.
run: release
	./scripts/run-demo.sh

## The whole test suite: unit tests and end-to-end tests over real sockets.
test: deps
	$(CARGO) test --all-targets

## Load benchmarks against nginx, HAProxy, Caddy, bare Pingora and the seed's
## gateways (benches/load), then the criterion microbenchmarks unless
## BENCH_QUICK=1. Results: benches/results/ and the README.
bench: deps
	./benches/load/run.sh
ifneq ($(BENCH_QUICK),1)
	$(CARGO) bench --bench router --bench jwt
endif

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

clean:
	$(CARGO) clean
