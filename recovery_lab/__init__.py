"""The lab: builds broken machines, boots them in QEMU and reports what happened."""
