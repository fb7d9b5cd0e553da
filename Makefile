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

## Microbenchmarks (criterion): route lookup, path normalization, config compile.
bench: deps
	$(CARGO) bench --bench router

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

clean:
	$(CARGO) clean
