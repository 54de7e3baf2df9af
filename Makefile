# runvm: build, install, test, demo, benchmarks.
#
#   make                 runvm, the static guest agent, the guest kernel and the initramfs in build/
#   make demo            the main job: build everything and boot a busybox guest in a runvm VM
#   make test            build everything and run all tests (unit, KVM, boot, end-to-end)
#   make bench           benchmarks against references (BENCHES="boot agent lifecycle share docker network templates" picks some)
#   make fuzz            each cargo-fuzz target for FUZZ_SECONDS (default 60; nightly toolchain)
#   make install PREFIX=/usr/local
#
# The guest kernel is cached outside the tree (see kernel-config/build.sh).

CARGO       ?= cargo
PREFIX      ?= /usr/local
TARGET      := x86_64-unknown-linux-gnu
BUILD       := build
SHARE       := $(BUILD)/share/runvm
RUNVM       := $(BUILD)/bin/runvm
AGENT       := target/$(TARGET)/agent/runvm-agent
TEST_BINS   := target/$(TARGET)/agent
STATIC      := RUSTFLAGS="-C target-feature=+crt-static"
# The template store of the test suites: every test VM of the default shape starts
# from the template made here; other shapes get theirs in the background.
TEMPLATES   := $(BUILD)/templates

.PHONY: all deps runvm agent kernel test-bins install test demo bench fuzz clean

all: $(RUNVM) $(SHARE)/vmlinux $(SHARE)/initramfs.cpio

deps:
	@scripts/install-deps.sh

runvm: deps
	$(CARGO) build --release -p runtime-cli

$(RUNVM): runvm
	@install -D -C target/release/runvm $@

# The agent runs as PID 1 in an initramfs with nothing else: it must be static.
agent: deps
	$(STATIC) $(CARGO) build --profile agent --target $(TARGET) -p guest-agent

# Static test programs that run in guests (a test /init, an AVX state checker).
test-bins: deps
	$(STATIC) $(CARGO) build --profile agent --target $(TARGET) -p runvm-tests --bin boot-check-init --bin avx-check --bin pattern --bin fs-check --bin fs-bench --bin net-bench

kernel: deps
	@mkdir -p $(BUILD)
	@kernel-config/build.sh > $(BUILD)/kernel.path.tmp
	@tail -n1 $(BUILD)/kernel.path.tmp > $(BUILD)/kernel.path && rm -f $(BUILD)/kernel.path.tmp

$(SHARE)/vmlinux: kernel
	@install -D -C -m 644 "$$(cat $(BUILD)/kernel.path)" $@
	@install -D -C -m 644 "$$(dirname "$$(cat $(BUILD)/kernel.path)")/bzImage" $(SHARE)/bzImage

$(SHARE)/initramfs.cpio: agent $(RUNVM)
	@mkdir -p $(SHARE)
	$(RUNVM) initramfs --agent $(AGENT) --output $@

install: all
	install -D -m 755 $(RUNVM) $(DESTDIR)$(PREFIX)/bin/runvm
	install -D -m 644 $(SHARE)/vmlinux $(DESTDIR)$(PREFIX)/share/runvm/vmlinux
	install -D -m 644 $(SHARE)/bzImage $(DESTDIR)$(PREFIX)/share/runvm/bzImage
	install -D -m 644 $(SHARE)/initramfs.cpio $(DESTDIR)$(PREFIX)/share/runvm/initramfs.cpio

# Tests that need /dev/kvm or the kernel skip with a reason; the summary lists them.
# The suites start their VMs from templates (the default): the default shape's is made
# first (without /dev/kvm, nothing is made and the VM tests skip); at the end, a template
# still being made in the background is waited for.
test: all test-bins
	@rm -f $(BUILD)/skipped.log
	@$(RUNVM) --template-dir $(TEMPLATES) template rm --all
	@if [ -c /dev/kvm ]; then \
	    echo "== making the default VM template"; \
	    $(RUNVM) --kernel $(SHARE)/vmlinux --initrd $(SHARE)/initramfs.cpio --template-dir $(TEMPLATES) template create; \
	fi
	RUNVM_KERNEL=$(abspath $(SHARE)/vmlinux) \
	RUNVM_INITRD=$(abspath $(SHARE)/initramfs.cpio) \
	RUNVM_BIN=$(abspath $(RUNVM)) \
	RUNVM_AGENT=$(abspath $(AGENT)) \
	RUNVM_TEST_BINS=$(abspath $(TEST_BINS)) \
	RUNVM_TEST_SKIP_LOG=$(abspath $(BUILD)/skipped.log) \
	RUNVM_TEMPLATE_DIR=$(abspath $(TEMPLATES)) \
	$(CARGO) test --release --workspace
	@flock $(TEMPLATES)/.lock true 2>/dev/null || true
	@$(RUNVM) --template-dir $(TEMPLATES) template list
	@if [ -s $(BUILD)/skipped.log ]; then echo "== skipped tests:"; cat $(BUILD)/skipped.log; else echo "== no test was skipped"; fi

demo: all
	@scripts/demo.sh $(abspath $(RUNVM))

bench: all test-bins
	@scripts/bench.sh $(abspath $(RUNVM)) $(abspath $(SHARE)/vmlinux) $(abspath $(SHARE)/initramfs.cpio) $(abspath $(AGENT)) $(abspath $(TEST_BINS)) $(BENCHES)

fuzz:
	@scripts/fuzz.sh

clean:
	$(CARGO) clean
	rm -rf $(BUILD)
