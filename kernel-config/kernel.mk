# Guest kernel: `make kernel ARCH=x86_64|aarch64` (cached; see image-build/build-kernel.sh).
.PHONY: kernel kernel-config-check

kernel:
	JOBS=$$(nproc) image-build/build-kernel.sh $(ARCH)

# Fragment sanity without building (parse, conflicts, allow list).
kernel-config-check:
	python3 image-build/kernel-tool.py merge --config-dir kernel-config --arch $(ARCH) --out /dev/null
