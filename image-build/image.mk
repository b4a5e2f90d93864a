# Guest images: `make image ARCH=x86_64|aarch64` -> build/<arch>/{vmlinuz|Image, initrd.img,
# rootfs.img, manifest.json}. Builds the kernel first when a `kernel` target exists; without
# one (or KERNEL=path given) the rootfs, initrd and disk image are still built.
.PHONY: image image-only test-image

IMAGE_TOOL = PYTHONPATH=image-build $(PY) -m kata_image

image: $(VENV)/.stamp
	@if [ -n "$(KERNEL)" ]; then \
		echo "[image] kernel from KERNEL=$(KERNEL)"; \
	else \
		$(MAKE) --no-print-directory -q kernel ARCH=$(ARCH) >/dev/null 2>&1; rc=$$?; \
		if [ $$rc -eq 2 ]; then echo "[image] no kernel target: building without a kernel"; \
		else echo "[image] building kernel"; $(MAKE) --no-print-directory kernel ARCH=$(ARCH) || exit 1; fi; \
	fi
	KERNEL="$(KERNEL)" $(IMAGE_TOOL) image --arch $(ARCH)

image-only: $(VENV)/.stamp
	KERNEL="$(KERNEL)" $(IMAGE_TOOL) image --arch $(ARCH)

test-image: $(VENV)/.stamp
	$(VENV)/bin/pytest tests/unit/test_image*.py tests/unit/test_initmode*.py tests/vm/test_image*.py
