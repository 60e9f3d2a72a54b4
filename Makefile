# The README's two commands: `make run` and `make test`.
SWIFT ?= swift

.PHONY: build run test bench clean

build:
	$(SWIFT) build

# Builds everything, starts one sandbox with the default profile, runs a command inside and tears it down.
# (cubicled, which serves the AgentCore API, arrives with the data-plane work; see docs/sandbox.md.)
run: build
	.build/debug/cubicle-sandbox-bench demo $(CURDIR) $(CURDIR)/.build/debug

# All tests. Those that need root (namespaces, cgroups, mounts) print why they skip when not root.
test:
	$(SWIFT) build --build-tests
	cc -O1 -Wall -o .build/cubicle-probe sandbox/probes/cubicle-probe.c
	$(SWIFT) test --skip-build

# Release build; sandbox spawn/teardown/memory beside bubblewrap, written to docs/benchmarks.md.
bench:
	$(SWIFT) build -c release
	.build/release/cubicle-sandbox-bench bench $(CURDIR) $(CURDIR)/.build/release 200 > docs/benchmarks.md.tmp
	mv docs/benchmarks.md.tmp docs/benchmarks.md
	cat docs/benchmarks.md

clean:
	rm -rf .build
