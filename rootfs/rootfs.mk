# Guest root filesystem (mkosi): `make rootfs ARCH=x86_64|aarch64` -> build/<arch>/work/mkosi-out/rootfs
# Rebuilt only when its inputs change (content hash of rootfs/, systemd/, the agent, the pins).
.PHONY: rootfs rootfs-force

IMAGE_TOOL = PYTHONPATH=image-build $(PY) -m kata_image

rootfs: $(VENV)/.stamp
	$(IMAGE_TOOL) rootfs --arch $(ARCH)

rootfs-force: $(VENV)/.stamp
	$(IMAGE_TOOL) rootfs --arch $(ARCH) --force
