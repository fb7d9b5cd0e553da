# The README's two commands: `make run` and `make test`.
CARGO ?= cargo

.PHONY: run test bench lint deps release clean install

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

## Install the release build as a systemd service: binary, unit, logrotate
## file, docs, the `tollgate` user, and a default config if there is none.
PREFIX ?= /usr/local
install: release
	install -D -m 0755 target/release/tollgate $(DESTDIR)$(PREFIX)/bin/tollgate
	install -D -m 0644 systemd/tollgate.service $(DESTDIR)/etc/systemd/system/tollgate.service
	install -D -m 0644 conf/logrotate $(DESTDIR)/etc/logrotate.d/tollgate
	install -D -m 0644 docs/operations.md $(DESTDIR)$(PREFIX)/share/doc/tollgate/operations.md
	install -D -m 0644 docs/configuration.md $(DESTDIR)$(PREFIX)/share/doc/tollgate/configuration.md
	test -e $(DESTDIR)/etc/tollgate/tollgate.yaml || install -D -m 0644 conf/tollgate.yaml $(DESTDIR)/etc/tollgate/tollgate.yaml
	id -u tollgate >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin tollgate
	@echo "installed; then: systemctl daemon-reload && systemctl enable --now tollgate"
