"""gpuslot.select_best_gpu: the seed's call, now race-free across processes.

The race it closes: processes started together all read the same free memory before any has
loaded its model. Each call here reserves what it asks for the life of its process, so the next
process sees it taken; the reservation vanishes when the process dies.
"""
import json
import os
import signal
import time

from conftest import wait_until, write_host, read_host

# Waits until the wall clock reaches GO (a shared start time), then selects, prints and holds.
_SELECT_AT_GO_AND_HOLD = """
    import os, sys, time
    import gpuslot
    go = float(os.environ["GO"])
    while time.time() < go:
        pass
    index = gpuslot.select_best_gpu(min_free_memory_gb=float(os.environ["GIB"]))
    print(index, flush=True)
    time.sleep(60)
"""


def _started_selections(processes, timeout=20):
    return wait_until(lambda: [p.stdout_text().strip() for p in processes] if all(
        p.stdout_text().strip() or p.poll() is not None for p in processes) else None, timeout=timeout,
        what="every process to print its GPU")


def test_two_processes_a_few_ms_apart_get_different_gpus(python_spawn, host, gpuslot):
    # 4 GPUs of 24 GiB, all idle: 16 GiB fits once per GPU. Without leases both would take GPU 0
    # (the lowest index wins ties); the control below shows exactly that.
    host_path = host("4x24g")
    go = time.time() + 1.5  # both interpreters are up and waiting by then
    first = python_spawn(_SELECT_AT_GO_AND_HOLD, host_path, env={"GO": go, "GIB": 16})
    second = python_spawn(_SELECT_AT_GO_AND_HOLD, host_path, env={"GO": go + 0.003, "GIB": 16})
    chosen = _started_selections([first, second])
    assert all(chosen), (first.stderr_text(), second.stderr_text())
    assert chosen[0] != chosen[1], "both processes got cuda:%s" % chosen[0]
    assert sorted(chosen) == ["0", "1"]
    # Control: a choice that reserves nothing (pick without --hold) ignores nobody and would have
    # put both on the same GPU had they not leased.
    held = json.loads(gpuslot("leases", "--json", host=host_path, check=0).stdout)["leases"]
    assert sorted(lease["pid"] for lease in held) == sorted([first.pid, second.pid])
    assert all(lease["command"].startswith("select_best_gpu: ") for lease in held)


def test_a_herd_of_processes_never_overfills_a_gpu(python_spawn, host):
    # 8 processes at once asking 12 GiB on 4 GPUs of 24 GiB: exactly two per GPU.
    host_path = host("4x24g")
    go = time.time() + 2.0
    herd = [python_spawn(_SELECT_AT_GO_AND_HOLD, host_path, env={"GO": go + k * 0.001, "GIB": 12}) for k in range(8)]
    chosen = _started_selections(herd, timeout=30)
    assert sorted(chosen) == ["0", "0", "1", "1", "2", "2", "3", "3"], [p.stderr_text() for p in herd]


def test_the_lease_disappears_when_the_process_is_killed(python_spawn, host, gpuslot):
    host_path = host("4x24g")
    holder = python_spawn(_SELECT_AT_GO_AND_HOLD, host_path, env={"GO": 0, "GIB": 20})
    assert _started_selections([holder]) == ["0"]
    held = json.loads(gpuslot("leases", "--json", host=host_path, check=0).stdout)["leases"]
    assert [(lease["pid"], lease["gpus"], lease["reserved"]) for lease in held] == [(holder.pid, [0], 20 << 30)]

    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    assert json.loads(gpuslot("leases", "--json", host=host_path, check=0).stdout)["leases"] == []
    # …and GPU 0 is whole again for the next one.
    again = json.loads(gpuslot("pick", "--mem", "20G", "--format", "json", host=host_path, check=0).stdout)
    assert again["chosen"][0]["index"] == 0


def test_leases_are_released_when_the_process_exits_normally(python_run, host, gpuslot):
    host_path = host("4x24g")
    python_run("""
        import gpuslot
        assert gpuslot.select_best_gpu(8) == 0
        assert gpuslot.select_best_gpu(8) == 1    # GPU 0 has 16 GiB left: no longer the most free
        assert gpuslot.select_best_gpu(20) == 2
    """, host=host_path)
    assert json.loads(gpuslot("leases", "--json", host=host_path, check=0).stdout)["leases"] == []


def test_release_held_leases(python_run, host):
    out = python_run("""
        import gpuslot, json, subprocess, sys
        gpuslot.select_best_gpu(8)
        gpuslot.resolve_device("cuda", min_free_memory_gb=4)
        print(gpuslot.release_held_leases(), gpuslot.release_held_leases())
        print(gpuslot.status()["gpus"][0]["leases"])
    """, host="4x24g").stdout.split("\n")
    assert out[0] == "2 0"
    assert out[1] == "[]"


def test_ordinal_is_inside_cuda_visible_devices(python_run, host):
    # Physical GPUs 2 and 3 are cuda:0 and cuda:1 of a process with CUDA_VISIBLE_DEVICES=2,3.
    host_path = host("4x24g")
    out = python_run("""
        import gpuslot
        first = gpuslot.select_best_gpu(20)           # GPU 2 = cuda:0
        second = gpuslot.select_best_gpu(20)          # GPU 2 is taken: GPU 3 = cuda:1
        print(first, second)
        print(gpuslot.status()["gpus"][2]["leases"][0]["gpus"], gpuslot.status()["gpus"][3]["leases"][0]["gpus"])
    """, host=host_path, env={"CUDA_VISIBLE_DEVICES": "2,3"}).stdout.split("\n")
    assert out[0] == "0 1"
    assert out[1] == "[2] [3]"


def test_exclude_gpus_takes_cuda_ordinals_and_uuids(python_run, host):
    host_path = host("4x24g")
    uuid_of_gpu_3 = read_host(host_path)["gpus"][3]["uuid"]
    out = python_run("""
        import gpuslot
        print(gpuslot.select_best_gpu(1, exclude_gpus=[0]))          # cuda:0 is GPU 2: GPU 3 = cuda:1
        print(gpuslot.select_best_gpu(1, exclude_gpus=0))
        print(gpuslot.select_best_gpu(1, exclude_gpus=["%s"], strategy="pack"))
    """ % uuid_of_gpu_3, host=host_path, env={"CUDA_VISIBLE_DEVICES": "2,3"}).stdout.split()
    assert out == ["1", "1", "0"]


def test_nothing_fits_raises_no_gpu_available_with_reasons(python_run, host):
    host_path = host("4x24g")
    data = read_host(host_path)
    for gpu in data["gpus"]:
        gpu["memory_used_mib"] = 20 * 1024
    write_host(host_path, data)
    out = python_run("""
        import gpuslot
        try:
            gpuslot.select_best_gpu(min_free_memory_gb=8.0)
        except gpuslot.NoGpuAvailable as error:
            print(type(error).__name__, error.exit_code)
            print(error)
            print(len(error.reasons))
            print(error.reasons[0])
    """, host=host_path).stdout.split("\n")
    assert out[0] == "NoGpuAvailable 1"
    assert out[1].startswith("no GPU fits now: 1 GPU with 8 GiB requested")
    assert out[2] == "4"
    assert out[3] == ("GPU 0 (NVIDIA GeForce RTX 3090) = cuda:0: too little memory: 4.00 GiB available, 8 GiB requested")


def test_without_a_driver_it_is_nvml_unavailable(python_run):
    out = python_run("""
        import gpuslot
        try:
            gpuslot.select_best_gpu()
        except gpuslot.NoGpuAvailable as error:   # NvmlUnavailable is a NoGpuAvailable
            print(type(error).__name__, error.exit_code, "\\n" in str(error))
    """, host=None).stdout.split()
    assert out == ["NvmlUnavailable", "3", "False"]


def test_mixed_host_without_pci_bus_id_refuses_to_guess_an_ordinal(python_run, host):
    out = python_run("""
        import gpuslot
        try:
            gpuslot.select_best_gpu(1)
        except gpuslot.BadInput as error:
            print(error)
    """, host=host("mixed")).stdout
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in out
    fine = python_run("import gpuslot; print(gpuslot.select_best_gpu(1))", host=host("mixed"),
                      env={"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}).stdout.strip()
    assert fine.isdigit()
