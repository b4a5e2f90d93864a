"""Host side: agent client, proxy, control CLI and the QEMU launcher."""
