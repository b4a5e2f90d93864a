"""Guest image builder: rootfs (mkosi), initrd (newc cpio), disk image (MBR + NVDIMM/DAX)."""
