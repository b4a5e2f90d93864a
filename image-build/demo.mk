# `make demo [ARCH=x86_64|aarch64]`: boot the guest image under QEMU (TCG) and run a busybox
# container in it through the agent. `make image` first: content-addressed, it builds the
# kernel and image when they are missing or older than their sources, and is a no-op otherwise.
.PHONY: demo

demo: $(VENV)/.stamp
	@$(MAKE) --no-print-directory image ARCH=$(ARCH)
	$(VENV)/bin/kata-vm-run --arch $(ARCH) -- echo hello from the guest
