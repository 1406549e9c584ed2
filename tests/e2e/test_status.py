"""`gpuslot status`: the table and the stable `--json` schema (DESIGN.md "Interfaces others rely on").

Every figure is checked against the host file the fake NVML serves, recomputed here in Python, so
a field that lands in the wrong place, a unit slip (MiB vs bytes) or a GPU missing from the list
fails by name. Hosts: 1, 8 and 64 GPUs, mixed models, a lost GPU, no driver, NVML init failing.
"""
import json
import os
import pwd
import signal
import subprocess
import time

import pytest

from conftest import read_host

MiB, GiB = 1 << 20, 1 << 30


def expected_gpu(gpu):
    """What the fake NVML reports for one host-file GPU (tests/fake_nvml/README.md)."""
    total = gpu["memory_total_mib"] * MiB
    used = min(total, (gpu.get("memory_used_mib", 0) + sum(p["used_mib"] for p in gpu.get("processes", []))) * MiB)
    return {"total": total, "used": used, "free": total - used}


def most_free(host, candidates=None):
    """Index of the GPU with the most free memory, ties to the lowest index (DESIGN.md "Selection")."""
    gpus = [(i, g) for i, g in enumerate(host["gpus"]) if g.get("state", "ok") == "ok"]
    if candidates is not None:
        gpus = [(i, g) for i, g in gpus if i in candidates]
    return min(gpus, key=lambda item: (-expected_gpu(item[1])["free"], item[0]))[0]


def status_json(gpuslot, host, env=None):
    result = gpuslot("status", "--json", host=host, env=env, check=0)
    return json.loads(result.stdout)


GPU_KEYS = {"index", "uuid", "name", "pci_bus_id", "memory", "utilization", "temperature_c", "healthy", "visible",
            "cuda_ordinal", "processes", "leases"}
MEMORY_KEYS = {"total", "used", "free", "reserved", "available"}


@pytest.mark.parametrize("name,env", [
    ("1x4090", {}),
    ("8x4090", {}),
    ("64x80g", {}),
    ("mixed", {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}),
])
def test_json_matches_the_host_file(gpuslot, host, name, env):
    path = host(name)
    expected_host = read_host(path)
    status = status_json(gpuslot, path, env)

    assert status["driver_version"] == expected_host["driver_version"]
    assert len(status["gpus"]) == len(expected_host["gpus"])
    for index, (shown, wanted) in enumerate(zip(status["gpus"], expected_host["gpus"])):
        assert GPU_KEYS <= shown.keys(), "GPU %d lacks %s" % (index, GPU_KEYS - shown.keys())
        assert MEMORY_KEYS <= shown["memory"].keys()
        assert {"gpu", "memory"} <= shown["utilization"].keys()
        assert (shown["index"], shown["uuid"], shown["name"], shown["pci_bus_id"]) == (
            index, wanted["uuid"], wanted["name"], wanted["pci_bus_id"])
        memory = expected_gpu(wanted)
        assert shown["memory"] == dict(shown["memory"], total=memory["total"], used=memory["used"],
                                       free=memory["free"], reserved=0, available=memory["free"])
        assert shown["utilization"] == {"gpu": wanted["utilization_gpu"], "memory": wanted["utilization_memory"]}
        assert shown["temperature_c"] == wanted["temperature_c"]
        assert shown["healthy"] is True and shown["visible"] is True and shown["cuda_ordinal"] == index
        assert [(p["pid"], p["used_memory"]) for p in shown["processes"]] == [
            (p["pid"], p["used_mib"] * MiB) for p in wanted["processes"]]
        for process in shown["processes"]:
            assert {"pid", "used_memory", "user", "command"} <= process.keys()
        assert shown["leases"] == []
    assert status["recommended"] == most_free(expected_host)


def test_table_shows_every_gpu_and_the_export_line(gpuslot):
    result = gpuslot("status", host="8x4090", check=0)
    lines = result.stdout.splitlines()
    assert lines[0] == "driver 550.54.15, CUDA 12.4, 8 GPUs"
    rows = [line for line in lines if line[:1].isdigit()]
    assert [int(row.split()[0]) for row in rows] == list(range(8))
    assert "23.76 GiB" in rows[1] and "cuda:1" in rows[1]
    assert "full" in rows[3]  # 23.63 of 23.99 GiB used
    assert lines[-1] == "recommended: GPU 1 (23.76 GiB available): export CUDA_VISIBLE_DEVICES=1 CUDA_DEVICE_ORDER=PCI_BUS_ID"
    assert result.stderr == ""


def test_lost_gpu_is_shown_unhealthy_and_never_recommended(gpuslot, host):
    path = host("lost")
    status = status_json(gpuslot, path)
    lost = status["gpus"][2]
    assert lost["healthy"] is False
    assert "GPU is lost" in lost["health_error"]
    assert lost["memory"]["free"] is None and lost["memory"]["available"] is None
    assert [g["healthy"] for g in status["gpus"]] == [True, True, False, True]
    assert status["recommended"] == 0

    # Only the lost GPU visible: nothing to recommend, and still no crash.
    alone = status_json(gpuslot, path, {"CUDA_VISIBLE_DEVICES": "2"})
    assert alone["recommended"] is None

    table = gpuslot("status", host=path, check=0).stdout
    row = next(line for line in table.splitlines() if line.startswith("2 "))
    assert "LOST" in row and "GPU is lost" in row


def test_no_driver_library_is_exit_3_with_one_line(gpuslot):
    for args in (["status"], ["status", "--json"]):
        result = gpuslot(*args, host="8x4090", env={"GPUSLOT_NVML_LIBRARY": "/nonexistent/libnvidia-ml.so.1"}, check=3)
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("gpuslot: ")
        assert "/nonexistent/libnvidia-ml.so.1" in result.stderr


def test_driver_not_loaded_is_exit_3(gpuslot):
    result = gpuslot("status", "--json", host=None, check=3)  # the fake without a host: DRIVER_NOT_LOADED
    assert result.stdout == ""
    assert result.stderr.startswith("gpuslot: ") and "Driver Not Loaded" in result.stderr


@pytest.mark.parametrize("init_error,message", [(9, "Driver Not Loaded"), (18, "Driver/library version mismatch")])
def test_nvml_init_failure_is_exit_3_with_nvmls_message(gpuslot, host, write_host, init_error, message):
    path = host("init_fails")
    state = read_host(path)
    state["init_error"] = init_error
    write_host(path, state)
    result = gpuslot("status", host=path, check=3)
    assert result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("gpuslot: ") and message in result.stderr


def start_job(fake_gpu_job, fake_env, host_path, *args, **env):
    """A fake-gpu-job that holds its memory once its first stdout line has appeared."""
    job = subprocess.Popen([str(fake_gpu_job), *map(str, args)], env=fake_env(host_path, **env),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = job.stdout.readline()
    if not line.startswith("fake-gpu-job: holding"):
        job.kill()
        pytest.fail("fake-gpu-job did not start: %s %s" % (line, job.stderr.read()))
    return job


def test_live_job_appears_with_pid_user_command_and_memory(gpuslot, host, fake_gpu_job, fake_env):
    path = host("8x4090")
    before = status_json(gpuslot, path)
    assert before["gpus"][1]["processes"] == []
    job = start_job(fake_gpu_job, fake_env, path, "--mem", "4G", "--seconds", "60", CUDA_VISIBLE_DEVICES="1")
    try:
        during = status_json(gpuslot, path)
        gpu = during["gpus"][1]
        assert [p["pid"] for p in gpu["processes"]] == [job.pid]
        process = gpu["processes"][0]
        assert process["used_memory"] == 4 * GiB
        assert process["user"] == pwd.getpwuid(os.getuid()).pw_name
        assert "fake-gpu-job" in process["command"] and "--mem 4G" in process["command"]
        assert gpu["memory"]["used"] == before["gpus"][1]["memory"]["used"] + 4 * GiB
        assert gpu["memory"]["available"] == gpu["memory"]["free"] == before["gpus"][1]["memory"]["free"] - 4 * GiB
        # 23.76 - 4 = 19.76 GiB now trails GPU 4's 21.01 GiB.
        assert during["recommended"] == 4
        for other in (0, 2, 3, 4, 5, 6, 7):
            assert during["gpus"][other] == before["gpus"][other]
    finally:
        job.kill()
        job.wait()
    after = status_json(gpuslot, path)
    assert after["gpus"][1]["processes"] == [] and after["recommended"] == 1


def test_held_reservation_shows_as_reserved_and_moves_the_recommendation(gpuslot, host):
    path = host("8x4090")
    held = gpuslot("pick", "--mem", "4G", "--hold", "120s", host=path, check=0)
    assert held.stdout == "1\n"
    status = status_json(gpuslot, path)
    gpu = status["gpus"][1]
    assert gpu["memory"]["reserved"] == 4 * GiB
    assert gpu["memory"]["available"] == gpu["memory"]["free"] - 4 * GiB
    assert len(gpu["leases"]) == 1 and gpu["leases"][0]["reserved"] == 4 * GiB
    assert all(g["leases"] == [] and g["memory"]["reserved"] == 0 for g in status["gpus"] if g["index"] != 1)
    assert status["recommended"] == 4


def test_watch_repeats_until_interrupted(gpuslot_path, fake_env, host, tmp_path):
    out = tmp_path / "watch.out"
    with open(out, "w") as stdout:
        watch = subprocess.Popen([str(gpuslot_path), "status", "--json", "--watch", "0.1"],
                                 env=fake_env(host("1x4090")), stdout=stdout, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while out.read_text().count("\n}\n") < 2 and time.monotonic() < deadline and watch.poll() is None:
            time.sleep(0.02)
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=10) == 0
    finally:
        watch.kill()
        watch.wait()
    # Each document is pretty-printed and ends with a "}" alone on its line.
    documents = [json.loads(chunk + "\n}") for chunk in out.read_text().split("\n}\n") if chunk.strip()]
    assert len(documents) >= 2
    assert all(len(d["gpus"]) == 1 and d["recommended"] == 0 for d in documents)
