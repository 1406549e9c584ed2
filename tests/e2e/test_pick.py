"""`gpuslot pick`: which GPUs a request gets, in which output format, and why.

Expected choices are computed here from the host file with a small Python model of DESIGN.md
"Selection" (filter, score by strategy, ties to the lowest NVML index), so the tests say what the
rule is rather than which number happened to come out.
"""
import json
import re
import shutil
import subprocess

import pytest

from conftest import read_host

MiB, GiB = 1 << 20, 1 << 30


def free_bytes(gpu):
    total = gpu["memory_total_mib"] * MiB
    used = min(total, (gpu.get("memory_used_mib", 0) + sum(p["used_mib"] for p in gpu.get("processes", []))) * MiB)
    return total - used


def model_pick(host, count=1, strategy="most-free", mem=0, exclude=(), max_util=None):
    """The NVML indices DESIGN.md's selection rule gives, best first."""
    candidates = []
    for index, gpu in enumerate(host["gpus"]):
        if index in exclude or gpu.get("state", "ok") != "ok" or free_bytes(gpu) < mem:
            continue
        utilization = gpu.get("utilization_gpu")
        if max_util is not None and utilization is not None and utilization > max_util:
            continue
        total = gpu["memory_total_mib"] * MiB
        score = {
            "most-free": -free_bytes(gpu),
            "pack": free_bytes(gpu),
            "least-used": (total - free_bytes(gpu)) / total,
            "least-busy": 1000 if utilization is None else utilization,
        }[strategy]
        candidates.append((score, index))
    return [index for _, index in sorted(candidates)[:count]] if len(candidates) >= count else None


def pick_indices(result):
    return [int(i) for i in result.stdout.strip().split(",")]


def test_default_pick_is_the_most_free_gpu(gpuslot, host):
    path = host("8x4090")
    result = gpuslot("pick", host=path, check=0)
    assert result.stdout == "1\n" and result.stderr == ""
    assert pick_indices(result) == model_pick(read_host(path))


def test_explain_gives_one_line_per_gpu(gpuslot):
    result = gpuslot("pick", "--explain", host="8x4090", check=0)
    lines = result.stderr.splitlines()
    assert len(lines) == 8
    for index, line in enumerate(lines):
        assert line.startswith("GPU %d (NVIDIA GeForce RTX 4090) = cuda:%d: " % (index, index))
    assert "chosen: most available memory (23.76 GiB)" in lines[1]
    assert all("eligible: " in line for i, line in enumerate(lines) if i != 1)
    assert result.stdout == "1\n"


def test_formats(gpuslot, host):
    path = host("8x4090")
    uuid = read_host(path)["gpus"][1]["uuid"]
    assert gpuslot("pick", "--format", "index", host=path, check=0).stdout == "1\n"
    assert gpuslot("pick", "--format", "uuid", host=path, check=0).stdout == uuid + "\n"
    assert gpuslot("pick", "--format", "env", host=path, check=0).stdout == (
        "export CUDA_VISIBLE_DEVICES=1 CUDA_DEVICE_ORDER=PCI_BUS_ID GPUSLOT_GPU_UUIDS=%s\n" % uuid)
    decision = json.loads(gpuslot("pick", "--format", "json", host=path, check=0).stdout)
    assert decision["fits"] is True
    assert decision["chosen"] == [{"index": 1, "uuid": uuid, "cuda_ordinal": 1,
                                   "available": free_bytes(read_host(path)["gpus"][1])}]
    assert [v["index"] for v in decision["verdicts"]] == list(range(8))
    assert [v["chosen"] for v in decision["verdicts"]] == [i == 1 for i in range(8)]


def test_env_format_can_be_evaluated_by_a_shell(gpuslot, host, fake_env):
    path = host("8x4090")
    line = gpuslot("pick", "--gpus", "2", "--format", "env", host=path, check=0).stdout
    shell = subprocess.run(["sh", "-c", line + 'printf "%s|%s|%s" "$CUDA_VISIBLE_DEVICES" "$CUDA_DEVICE_ORDER" '
                                              '"$GPUSLOT_GPU_UUIDS"'],
                           env=fake_env(path), capture_output=True, text=True, check=True)
    gpus = read_host(path)["gpus"]
    assert shell.stdout == "1,4|PCI_BUS_ID|%s,%s" % (gpus[1]["uuid"], gpus[4]["uuid"])


@pytest.mark.parametrize("count", [2, 3, 8])
def test_several_gpus_best_first(gpuslot, host, count):
    path = host("8x4090")
    result = gpuslot("pick", "--gpus", count, host=path, check=0)
    assert pick_indices(result) == model_pick(read_host(path), count=count)
    uuids = gpuslot("pick", "--gpus", count, "--format", "uuid", host=path, check=0).stdout.strip().split(",")
    assert uuids == [read_host(path)["gpus"][i]["uuid"] for i in pick_indices(result)]


def test_two_gpus_are_1_then_4(gpuslot):
    assert gpuslot("pick", "--gpus", "2", host="8x4090", check=0).stdout == "1,4\n"


@pytest.mark.parametrize("name", ["8x4090", "64x80g", "mixed", "no_utilization"])
@pytest.mark.parametrize("strategy,mem", [("most-free", 0), ("least-used", 0), ("least-busy", 0), ("pack", 8 * GiB),
                                          ("pack", 10 * GiB), ("most-free", 20 * GiB)])
def test_strategies_match_the_model(gpuslot, host, name, strategy, mem):
    path = host(name)
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    args = ["pick", "--strategy", strategy, "--gpus", "2"] + (["--mem", "%dM" % (mem // MiB)] if mem else [])
    expected = model_pick(read_host(path), count=2, strategy=strategy, mem=mem)
    result = gpuslot(*args, host=path, env=env)
    if expected is None:
        assert result.returncode == 1 and result.stdout == ""
    else:
        assert result.returncode == 0, result.stderr
        assert pick_indices(result) == expected


def test_ties_go_to_the_lowest_index(gpuslot, host, write_host):
    path = host("8x24g")  # eight identical idle GPUs
    assert gpuslot("pick", host=path, check=0).stdout == "0\n"
    assert gpuslot("pick", "--gpus", "3", host=path, check=0).stdout == "0,1,2\n"
    for strategy in ("least-used", "least-busy", "pack"):
        assert gpuslot("pick", "--strategy", strategy, host=path, check=0).stdout == "0\n"
    state = read_host(path)
    for gpu in state["gpus"]:
        gpu["memory_used_mib"] = 4096
    state["gpus"][5]["memory_used_mib"] = state["gpus"][2]["memory_used_mib"] = 1024  # best, tied
    write_host(path, state)
    assert gpuslot("pick", host=path, check=0).stdout == "2\n"
    assert gpuslot("pick", "--gpus", "3", host=path, check=0).stdout == "2,5,0\n"


def test_64_gpus_most_free_matches_python(gpuslot, host):
    path = host("64x80g")
    state = read_host(path)
    best = max(range(64), key=lambda i: (free_bytes(state["gpus"][i]), -i))
    assert gpuslot("pick", host=path, check=0).stdout == "%d\n" % best
    assert pick_indices(gpuslot("pick", "--gpus", "16", host=path, check=0)) == model_pick(state, count=16)
    assert pick_indices(gpuslot("pick", "--mem", "70G", "--exclude", "0,6", host=path, check=0)) == model_pick(
        state, mem=70 * GiB, exclude=(0, 6))


def test_memory_requirement(gpuslot, host):
    path = host("8x4090")
    assert gpuslot("pick", "--mem", "22G", host=path, check=0).stdout == "1\n"
    assert gpuslot("pick", "--mem", "21G", "--gpus", "2", host=path, check=0).stdout == "1,4\n"
    assert gpuslot("pick", "--mem", "21G", "--gpus", "2", "--strategy", "pack", host=path, check=0).stdout == "4,1\n"
    now = gpuslot("pick", "--mem", "22G", "--gpus", "2", host=path, check=1)
    assert now.stdout == "" and now.stderr.startswith("gpuslot: no GPU fits") and now.stderr.count("\n") == 1
    never = gpuslot("pick", "--mem", "30G", host=path, check=1)
    assert "30 GiB" in never.stderr and "23.99 GiB" in never.stderr


def test_exclude_by_index_and_uuid_prefix(gpuslot, host):
    path = host("8x4090")
    assert gpuslot("pick", "--exclude", "1,4", host=path, check=0).stdout == "6\n"
    prefix = read_host(path)["gpus"][1]["uuid"][:10]
    assert gpuslot("pick", "--exclude", prefix, host=path, check=0).stdout == "4\n"
    assert gpuslot("pick", "--exclude", prefix.upper().replace("GPU-", "gpu-"), host=path, check=0).stdout == "4\n"
    explained = gpuslot("pick", "--exclude", "1", "--explain", host=path, check=0).stderr.splitlines()
    assert explained[1].endswith(": excluded")


def test_max_util(gpuslot, host):
    path = host("8x4090")
    assert gpuslot("pick", "--max-util", "20", "--gpus", "2", host=path, check=0).stdout == "1,4\n"
    busy = gpuslot("pick", "--max-util", "0", "--exclude", "1", "--explain", host=path, check=1)
    assert "too busy: 12% utilization, at most 0% allowed" in busy.stderr


def test_lost_gpu_is_never_picked(gpuslot, host):
    path = host("lost")
    assert gpuslot("pick", "--gpus", "3", host=path, check=0).stdout == "0,1,3\n"
    assert gpuslot("pick", "--gpus", "4", host=path, check=1).stdout == ""
    assert gpuslot("pick", "--exclude", "0,1,3", host=path, check=1).stdout == ""
    assert gpuslot("pick", host=path, env={"CUDA_VISIBLE_DEVICES": "2"}, check=1).stdout == ""
    explained = gpuslot("pick", "--explain", host=path, check=0).stderr.splitlines()
    assert len(explained) == 4 and "unhealthy: GPU is lost" in explained[2]


def test_one_gpu_host(gpuslot, host):
    path = host("1x4090")
    assert gpuslot("pick", host=path, check=0).stdout == "0\n"
    assert gpuslot("pick", "--gpus", "2", host=path, check=1).stdout == ""


def test_no_driver_and_failing_init_are_exit_3(gpuslot):
    missing = gpuslot("pick", host="8x4090", env={"GPUSLOT_NVML_LIBRARY": "/nonexistent"}, check=3)
    assert missing.stdout == "" and missing.stderr.count("\n") == 1 and "/nonexistent" in missing.stderr
    failing = gpuslot("pick", host="init_fails", check=3)
    assert failing.stderr.startswith("gpuslot: NVML failed to initialise") and "Driver Not Loaded" in failing.stderr


def test_a_running_job_changes_the_choice(gpuslot, host, fake_gpu_job, fake_env):
    path = host("8x4090")
    assert gpuslot("pick", host=path, check=0).stdout == "1\n"
    job = subprocess.Popen([str(fake_gpu_job), "--mem", "4G", "--seconds", "60"],
                           env=fake_env(path, CUDA_VISIBLE_DEVICES="1"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        assert job.stdout.readline().startswith("fake-gpu-job: holding"), job.stderr.read()
        # GPU 1: 23.76 - 4 = 19.76 GiB; GPU 4 has 21.01 GiB.
        assert gpuslot("pick", host=path, check=0).stdout == "4\n"
        assert gpuslot("pick", "--mem", "20G", host=path, check=0).stdout == "4\n"
        assert gpuslot("pick", "--mem", "22G", host=path, check=1).stdout == ""
    finally:
        job.kill()
        job.wait()
    assert gpuslot("pick", host=path, check=0).stdout == "1\n"


# --device restricts the choice to one GPU, but the numbers reported must stay this process's
# own: the CUDA ordinal of a GPU does not change because the request named it.

def test_device_restriction_reports_the_process_cuda_ordinal(gpuslot, host):
    path = host("8x4090")
    env = {"CUDA_VISIBLE_DEVICES": "5,4"}  # physical 4 is cuda:1 here
    result = gpuslot("pick", "--device", "cuda:1", "--format", "json", "--explain", host=path, env=env, check=0)
    decision = json.loads(result.stdout)
    assert [(c["index"], c["cuda_ordinal"]) for c in decision["chosen"]] == [(4, 1)]
    assert "GPU 4 (NVIDIA GeForce RTX 4090) = cuda:1: chosen" in result.stderr


def test_device_restriction_does_not_blame_cuda_visible_devices(gpuslot):
    # No CUDA_VISIBLE_DEVICES at all: GPU 0 is passed over because of --device, nothing else.
    result = gpuslot("pick", "--device", "cuda:3", "--explain", host="8x4090", check=0)
    assert result.stdout == "3\n"
    line = result.stderr.splitlines()[0]
    assert line.startswith("GPU 0 ") and "CUDA_VISIBLE_DEVICES" not in line


# No more than one NVML query pass per command (the performance target): count the calls
# that start a pass (nvmlDeviceGetCount*) and the per-GPU memory reads, with gdb breakpoints on the
# fake library's exported functions. gdb is a stock debugger, not a test dependency: without it
# (or without ptrace permission) the test says so and is skipped.

COUNTED = ["nvmlDeviceGetCount_v2", "nvmlDeviceGetCount", "nvmlDeviceGetMemoryInfo_v2", "nvmlDeviceGetMemoryInfo",
           "nvmlInit_v2", "nvmlInit"]


def nvml_call_counts(gpuslot_path, environment, args, tmp_path):
    """{NVML function: calls} for one run of gpuslot, counted by gdb breakpoints that never stop."""
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("skipped: gdb is not installed, so NVML calls cannot be counted")
    script = tmp_path / "count.gdb"
    lines = ["set breakpoint pending on", "set pagination off", "set confirm off"]
    lines += ["break %s" % name for name in COUNTED]
    lines += ["ignore %d 1000000" % number for number in range(1, len(COUNTED) + 1)]
    lines += ["run", "info breakpoints"]
    script.write_text("\n".join(lines) + "\n")
    result = subprocess.run([gdb, "-q", "-batch", "-nx", "-x", str(script), "--args", str(gpuslot_path), *args],
                            env=environment, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    if "ptrace" in output and "not permitted" in output:
        pytest.skip("skipped: ptrace is not permitted here, so NVML calls cannot be counted")
    assert re.search(r"exited (normally|with code)", output), output
    counts, current = {}, None
    for line in output.splitlines():
        header = re.match(r"^(\d+)\s+breakpoint\s", line)
        if header:
            current = COUNTED[int(header.group(1)) - 1]
            counts.setdefault(current, 0)
            continue
        hits = re.match(r"^\s+breakpoint already hit (\d+) times?", line)
        if hits and current is not None:
            counts[current] += int(hits.group(1))
    assert set(counts) == set(COUNTED), output
    return counts


@pytest.mark.parametrize("args", [["pick"], ["pick", "--gpus", "2", "--explain"], ["status", "--json"], ["status"],
                                  ["device"]])
def test_one_nvml_pass_per_command(gpuslot_path, fake_env, host, tmp_path, args):
    counts = nvml_call_counts(gpuslot_path, fake_env(host("8x4090")), args, tmp_path)
    passes = counts.get("nvmlDeviceGetCount_v2", 0) + counts.get("nvmlDeviceGetCount", 0)
    memory_reads = counts.get("nvmlDeviceGetMemoryInfo_v2", 0) + counts.get("nvmlDeviceGetMemoryInfo", 0)
    inits = counts.get("nvmlInit_v2", 0) + counts.get("nvmlInit", 0)
    assert (passes, memory_reads, inits) == (1, 8, 1), counts
