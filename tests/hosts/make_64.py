#!/usr/bin/env python3
"""Writes 64x80g.json: 64 H100 80GB GPUs with varied usage, for scale tests (a `pick` on 64
GPUs must stay fast) and for strategies that need many distinct candidates.

The output is committed beside this script; rerun it after changing the pattern:
    python3 tests/hosts/make_64.py > tests/hosts/64x80g.json
Deterministic (no randomness) so the committed file and a regenerated one never differ.
"""
import hashlib
import json
import sys

TOTAL_MIB = 81559          # what nvidia-smi reports for an H100 80GB HBM3
BASELINE_MIB = 537         # driver/context memory outside any process on an idle H100
FIRST_PID = 2100001        # far above typical pids, below pid_max 4194304


def uuid(index):
    # Random-looking but reproducible: hex digits from a hash of the index.
    h = hashlib.sha256(b"gpuslot-h100-%d" % index).hexdigest()
    return "GPU-%s-%s-%s-%s-%s" % (h[0:8], h[8:12], h[12:16], h[16:20], h[20:32])


def gpu(index):
    # Eight usage patterns, rotated so that neighbours differ: idle, light, half, heavy, full...
    pattern = [0, 4096, 40960, 61440, 80384, 12288, 0, 30720][index % 8]
    processes = []
    if pattern:
        # Split the load over one to three processes, as shared servers look.
        parts = 1 + index % 3
        share = pattern // parts
        for p in range(parts):
            used = share if p < parts - 1 else pattern - share * (parts - 1)
            processes.append({"pid": FIRST_PID + index * 3 + p, "used_mib": used})
    busy = 0 if not pattern else min(100, 15 + (index * 37) % 86)
    return {
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": uuid(index),
        # 16 GPUs per PCI domain, one per bus: PCI order is index order.
        "pci_bus_id": "%08X:%02X:00.0" % (index // 16, 0x10 * (index % 16) + 0x0A),
        "pci_device_id": "233010DE",
        "compute_capability": "9.0",
        "memory_total_mib": TOTAL_MIB,
        "memory_used_mib": BASELINE_MIB,
        "utilization_gpu": busy,
        "utilization_memory": busy // 2,
        "temperature_c": 31 + busy // 3,
        "power_mw": 70000 + busy * 6000,
        "processes": processes,
        "state": "ok",
    }


def main():
    gpus = [gpu(i) for i in range(64)]
    out = sys.stdout
    out.write('{\n  "driver_version": "550.54.15",\n  "cuda_driver_version": 12040,\n  "gpus": [\n')
    out.write(",\n".join("    " + json.dumps(g) for g in gpus))
    out.write("\n  ]\n}\n")


if __name__ == "__main__":
    main()
