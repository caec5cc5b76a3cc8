# nex — the two commands that matter:
#   make run    set up what is missing, build, start NATS + a node, deploy the echo service, ask it something
#   make test   set up what is missing, build, run every test (what CI runs)

SHELL := /bin/bash
CARGO ?= cargo
export NEX_NATS_SERVER ?= $(shell python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)/nats-server

.PHONY: setup build run test lint bench fmt clean

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --release --workspace --bins
	$(CARGO) build --release -p echoservice -p escapeprobe --target x86_64-unknown-linux-musl
	$(CARGO) build --release -p echofunction -p kvfunction --target wasm32-wasip1
	@# The micro-VM guest image: Debian's cloud kernel + nex-agent as init (downloads once).
	target/release/nex rootfs --out target/microvm || echo "warning: no micro-VM guest image (see above); the microvm tests will fail"

run: build
	@scripts/run.sh

test: build
	$(CARGO) test --release --workspace

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

bench: build
	target/release/nex bench

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
