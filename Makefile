# The README's two commands: `make run` and `make test`.
SWIFT ?= swift
SHELL := /bin/bash

.PHONY: build run sandbox-demo test soak fuzz bench install clean

build:
	$(SWIFT) build

LISTEN ?= 127.0.0.1:8080

# Builds everything and runs cubicled in the foreground with the embedded `demo` runtime. Ctrl-C ends it cleanly.
run: build
	.build/debug/cubicled --listen $(LISTEN)

# One sandbox, one command inside, teardown: the sandbox layer alone.
sandbox-demo: build
	.build/debug/cubicle-sandbox-bench demo $(CURDIR) $(CURDIR)/.build/debug

# All tests. Those that need root (namespaces, cgroups, mounts) print why they skip when not root.
# Suites that exhaust host-wide limits when a protection is missing (SERIAL_SUITES) run after the others,
# alone, so a regression fails them and nothing beside them.
SERIAL_SUITES = HostLimitTests
test:
	$(SWIFT) build --build-tests
	cc -O1 -Wall -static -o .build/cubicle-probe sandbox/probes/cubicle-probe.c
	$(SWIFT) test --skip-build --skip '$(SERIAL_SUITES)'
	$(SWIFT) test --skip-build --filter '$(SERIAL_SUITES)'
	for t in $(FUZZ_TARGETS); do .build/debug/cubicle-fuzz-$$t Tests/Fuzz/corpus/$$t || exit 1; done
	$(MAKE) fuzz FUZZ_SECONDS=20
	python3 -m pytest -q $(shell python3 -c 'import xdist' 2>/dev/null && echo "-n 4") -m "not serial" Tests/e2e
	python3 -m pytest -q -m serial Tests/e2e

# libFuzzer on the RPC frame decoder, the event-stream codec and the request validators, each for
# FUZZ_SECONDS, from the seed corpus in Tests/Fuzz/corpus (what they find new stays in .build/fuzz-corpus;
# a crash is written to .build/fuzz-artifacts and fails the target). `make test` runs it for 20 s each.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS = rpc-frames event-stream validators dns sigv4
FUZZ_BUILD = $(SWIFT) build -c release --scratch-path .build/fuzz -Xswiftc -sanitize=fuzzer,address -Xswiftc -DCUBICLE_FUZZ -Xswiftc -use-ld=lld

fuzz:
	for t in $(FUZZ_TARGETS); do $(FUZZ_BUILD) --product cubicle-fuzz-$$t || exit 1; done
	mkdir -p .build/fuzz-artifacts
	for t in $(FUZZ_TARGETS); do \
		mkdir -p .build/fuzz-corpus/$$t && \
		SWIFT_BACKTRACE=enable=no .build/fuzz/release/cubicle-fuzz-$$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
			-artifact_prefix=$(CURDIR)/.build/fuzz-artifacts/$$t- .build/fuzz-corpus/$$t Tests/Fuzz/corpus/$$t 2>&1 \
			| grep -E "^(stat::|INFO: seed corpus|==[0-9]+==|SUMMARY|Done|#[0-9]+ *DONE)|Fatal error|[Pp]recondition" ; \
		test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	done

# 10,000 sessions created and ended; cubicled's descriptors, threads and memory must come back and nothing
# of any session may remain (Tests/e2e/test_churn.py; the normal suite runs 300).
soak: build
	CUBICLE_CHURN=10000 python3 -m pytest -q -s Tests/e2e/test_churn.py

# Release build; every benchmark beside its peer in the same run (bubblewrap, unshare, crun, runc; the agent
# called directly and through HAProxy), density and rates, written to docs/benchmarks.md with a PNG of the
# cold-start distributions. The steps are listed at the top of docs/benchmarks.md.
BENCH_SAMPLES = .build/bench-samples
BENCH_OUT = docs/benchmarks.md.tmp

.PHONY: bench-deps
bench-deps:
	apt-get install -y bubblewrap crun runc haproxy wrk gnuplot-nox busybox-static

bench:
	$(SWIFT) build -c release
	rm -rf $(BENCH_SAMPLES) && mkdir -p $(BENCH_SAMPLES)
	python3 Tests/bench/machine.py > $(BENCH_OUT)
	.build/release/cubicle-sandbox-bench bench $(CURDIR) $(CURDIR)/.build/release 200 $(BENCH_SAMPLES) >> $(BENCH_OUT)
	echo >> $(BENCH_OUT)
	python3 Tests/bench/sandbox_peers.py .build/release $(BENCH_SAMPLES) 200 >> $(BENCH_OUT)
	echo >> $(BENCH_OUT)
	CUBICLE_BENCH_SAMPLES=$(BENCH_SAMPLES) python3 Tests/bench/dataplane_bench.py .build/release >> $(BENCH_OUT)
	echo >> $(BENCH_OUT)
	python3 Tests/bench/warm_pool_bench.py .build/release >> $(BENCH_OUT)
	echo >> $(BENCH_OUT)
	python3 Tests/bench/auth_bench.py .build/release >> $(BENCH_OUT)
	echo >> $(BENCH_OUT)
	python3 Tests/bench/websocket_bench.py .build/release >> $(BENCH_OUT)
	echo >> $(BENCH_OUT)
	python3 Tests/bench/scale_bench.py .build/release 1000 30 >> $(BENCH_OUT)
	echo >> $(BENCH_OUT)
	python3 Tests/bench/noisy_bench.py .build/release >> $(BENCH_OUT)
	echo >> $(BENCH_OUT)
	python3 Tests/bench/egress_bench.py .build/release >> $(BENCH_OUT)
	echo >> $(BENCH_OUT)
	python3 Tests/bench/image_bench.py .build/release 100 >> $(BENCH_OUT)
	python3 Tests/bench/plot_cold_start.py $(BENCH_SAMPLES) docs/benchmarks-cold-start.png
	mv $(BENCH_OUT) docs/benchmarks.md
	cat docs/benchmarks.md

# A release build with the Swift runtime linked into each binary, so the target host needs no toolchain
# (only libseccomp2, libnftables1, libarchive13 and libstdc++), installed with the systemd unit. The Dockerfile runs the same target.
PREFIX ?= /usr/local
DESTDIR ?=
SYSTEMD_UNIT_DIR ?= /etc/systemd/system
INSTALL_BUILD ?= .build/static
PRODUCTS_TO_INSTALL = cubicled cubicle-init cubicle cubicle-demo-agent

install:
	$(SWIFT) build -c release --static-swift-stdlib --scratch-path $(INSTALL_BUILD)
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 0755 $(foreach p,$(PRODUCTS_TO_INSTALL),$(INSTALL_BUILD)/release/$(p)) $(DESTDIR)$(PREFIX)/bin/
	install -d $(DESTDIR)$(PREFIX)/share/cubicle
	install -m 0644 sandbox/seccomp/default.json $(DESTDIR)$(PREFIX)/share/cubicle/seccomp-default.json
	install -d $(DESTDIR)$(PREFIX)/share/doc/cubicle
	install -m 0644 README.md docs/deploy.md docs/sandbox.md docs/dataplane.md docs/security.md $(DESTDIR)$(PREFIX)/share/doc/cubicle/
	if [ -n "$(SYSTEMD_UNIT_DIR)" ]; then \
		install -d $(DESTDIR)$(SYSTEMD_UNIT_DIR) $(DESTDIR)/etc/default && \
		sed -e 's|@BINDIR@|$(PREFIX)/bin|' -e 's|@DOCDIR@|$(PREFIX)/share/doc/cubicle|' packaging/systemd/cubicled.service > $(DESTDIR)$(SYSTEMD_UNIT_DIR)/cubicled.service && \
		{ [ -e $(DESTDIR)/etc/default/cubicled ] || install -m 0644 packaging/systemd/cubicled.default $(DESTDIR)/etc/default/cubicled; }; \
	fi

clean:
	rm -rf .build
