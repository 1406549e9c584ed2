"""`gpuslot device [SPEC]`: a service's `…_DEVICE=auto|cuda|cuda:N|cpu|GPU-<uuid>` setting resolved
to what it passes its framework, `cuda:N` (this process's CUDA ordinal) or `cpu`.

stdout is exactly one word; stderr has one memory line per visible GPU and a `chosen:` line, or
says why the answer is cpu. Exit codes: 0, 1 nothing fits, 2 bad spec, 3 GPU required but no NVML.
"""
import pytest

from conftest import read_host

MiB = 1 << 20
NO_DRIVER = {"GPUSLOT_NVML_LIBRARY": "/nonexistent/libnvidia-ml.so.1"}


def gib(n_bytes):
    return "%.2f GiB" % (n_bytes / (1 << 30))


def memory_line(index, gpu):
    total = gpu["memory_total_mib"] * MiB
    used = (gpu.get("memory_used_mib", 0) + sum(p["used_mib"] for p in gpu.get("processes", []))) * MiB
    return "GPU %d (%s): total %s, used %s, free %s" % (index, gpu["name"], gib(total), gib(used), gib(total - used))


def test_auto_prints_the_best_gpu_and_every_memory_line(gpuslot, host):
    path = host("8x4090")
    result = gpuslot("device", host=path, check=0)
    assert result.stdout == "cuda:1\n"
    lines = result.stderr.splitlines()
    assert lines[:8] == [memory_line(i, gpu) for i, gpu in enumerate(read_host(path)["gpus"])]
    assert lines[1] == "GPU 1 (NVIDIA GeForce RTX 4090): total 23.99 GiB, used 0.23 GiB, free 23.76 GiB"
    assert len(lines) == 9 and lines[8].startswith("chosen: cuda:1 = GPU 1 (NVIDIA GeForce RTX 4090)")


@pytest.mark.parametrize("spec,expected", [("auto", "cuda:1"), ("cuda", "cuda:1"), ("cuda:0", "cuda:0"),
                                           ("cuda:7", "cuda:7"), ("CUDA:2", "cuda:2"), (" cuda:2 ", "cuda:2"),
                                           ("cpu", "cpu"), ("GPU-4cd5dd1f", "cuda:4"), ("gpu-4CD5", "cuda:4")])
def test_specs(gpuslot, spec, expected):
    assert gpuslot("device", spec, host="8x4090", check=0).stdout == expected + "\n"


def test_low_memory_choice_warns_but_proceeds(gpuslot):
    result = gpuslot("device", "cuda:3", host="8x4090", check=0)
    assert result.stdout == "cuda:3\n"
    assert "gpuslot: warning: GPU 3 has only 0.36 GiB available" in result.stderr.splitlines()


def test_cpu_never_touches_nvml(gpuslot):
    result = gpuslot("device", "cpu", host=None, env=NO_DRIVER, check=0)
    assert result.stdout == "cpu\n" and "cpu" in result.stderr


def test_spec_from_environment(gpuslot):
    from_default_env = gpuslot("device", host="8x4090", env={"GPUSLOT_DEVICE": "cuda:2"}, check=0)
    assert from_default_env.stdout == "cuda:2\n" and "GPUSLOT_DEVICE" in from_default_env.stderr
    named = gpuslot("device", "--env", "ASR_DEVICE", host="8x4090",
                    env={"ASR_DEVICE": "cuda:5", "GPUSLOT_DEVICE": "cpu"}, check=0)
    assert named.stdout == "cuda:5\n" and "ASR_DEVICE" in named.stderr
    argument_wins = gpuslot("device", "cuda:6", host="8x4090", env={"GPUSLOT_DEVICE": "cpu"}, check=0)
    assert argument_wins.stdout == "cuda:6\n"
    empty_is_auto = gpuslot("device", host="8x4090", env={"GPUSLOT_DEVICE": ""}, check=0)
    assert empty_is_auto.stdout == "cuda:1\n"
    unset_named = gpuslot("device", "--env", "ASR_DEVICE", host="8x4090", env={"GPUSLOT_DEVICE": "cuda:3"}, check=0)
    assert unset_named.stdout == "cuda:1\n"  # ASR_DEVICE unset: auto, GPUSLOT_DEVICE is not consulted


def test_bad_spec_from_environment_names_the_variable(gpuslot):
    result = gpuslot("device", "--env", "ASR_DEVICE", host="8x4090", env={"ASR_DEVICE": "gpu0"}, check=2)
    assert result.stdout == "" and result.stderr.count("\n") == 1
    assert "gpu0" in result.stderr and "ASR_DEVICE" in result.stderr


def test_ordinal_beyond_the_visible_gpus_is_bad_input(gpuslot):
    result = gpuslot("device", "cuda:9", host="8x4090", check=2)
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith("gpuslot: ") and "cuda:9" in result.stderr.splitlines()[-1]
    inside = gpuslot("device", "cuda:2", host="8x4090", env={"CUDA_VISIBLE_DEVICES": "4,5"}, check=2)
    assert "cuda:2" in inside.stderr.splitlines()[-1]


def test_memory_requirement(gpuslot):
    assert gpuslot("device", "--mem", "22G", host="8x4090", check=0).stdout == "cuda:1\n"
    assert gpuslot("device", "cuda", "--mem", "20G", host="8x4090", check=0).stdout == "cuda:1\n"
    never = gpuslot("device", "--mem", "30G", host="8x4090", check=1)
    assert never.stdout == "" and never.stderr.splitlines()[-1].startswith("gpuslot: no GPU fits")


def test_named_gpu_without_room_reports_its_own_ordinal(gpuslot):
    result = gpuslot("device", "cuda:3", "--mem", "4G", host="8x4090", check=1)
    assert result.stdout == ""
    assert "GPU 3 (NVIDIA GeForce RTX 4090) = cuda:3: too little memory: 0.36 GiB available" in result.stderr


def test_no_driver(gpuslot):
    auto = gpuslot("device", host=None, env=NO_DRIVER, check=0)
    assert auto.stdout == "cpu\n"
    assert "no NVIDIA driver" in auto.stderr and "auto: using cpu" in auto.stderr
    assert gpuslot("device", "auto", host=None, env=NO_DRIVER, check=0).stdout == "cpu\n"
    for spec in ("cuda", "cuda:0", "GPU-4cd5"):
        required = gpuslot("device", spec, host=None, env=NO_DRIVER, check=3)
        assert required.stdout == "" and required.stderr.count("\n") == 1
        assert required.stderr.startswith("gpuslot: ") and "/nonexistent/libnvidia-ml.so.1" in required.stderr


def test_nvml_init_failing(gpuslot):
    auto = gpuslot("device", host="init_fails", check=0)
    assert auto.stdout == "cpu\n" and "Driver Not Loaded" in auto.stderr
    required = gpuslot("device", "cuda", host="init_fails", check=3)
    assert required.stdout == "" and "NVML failed to initialise" in required.stderr


def test_fake_nvml_without_a_host_is_a_machine_without_driver(gpuslot):
    assert gpuslot("device", host=None, check=0).stdout == "cpu\n"
    assert gpuslot("device", "cuda", host=None, check=3).stdout == ""


def test_no_visible_gpu(gpuslot):
    hidden = {"CUDA_VISIBLE_DEVICES": ""}
    auto = gpuslot("device", host="8x4090", env=hidden, check=0)
    assert auto.stdout == "cpu\n" and "CUDA_VISIBLE_DEVICES" in auto.stderr
    required = gpuslot("device", "cuda", host="8x4090", env=hidden, check=3)
    assert required.stdout == "" and "CUDA_VISIBLE_DEVICES" in required.stderr


def test_host_without_gpus(gpuslot, tmp_path, write_host):
    path = tmp_path / "empty.json"
    write_host(path, {"driver_version": "550.54.15", "gpus": []})
    auto = gpuslot("device", host=path, check=0)
    assert auto.stdout == "cpu\n" and "no NVIDIA GPU" in auto.stderr
    assert gpuslot("device", "cuda", host=path, check=3).stdout == ""


def test_lost_gpu(gpuslot):
    assert gpuslot("device", host="lost", check=0).stdout == "cuda:0\n"
    assert gpuslot("device", host="lost", env={"CUDA_VISIBLE_DEVICES": "2,3"}, check=0).stdout == "cuda:1\n"
    lost = gpuslot("device", "cuda:2", host="lost", check=1)
    assert lost.stdout == "" and "GPU is lost" in lost.stderr


def test_one_and_sixty_four_gpus(gpuslot):
    assert gpuslot("device", host="1x4090", check=0).stdout == "cuda:0\n"
    assert gpuslot("device", "cuda:1", host="1x4090", check=2).stdout == ""
    # 64 H100s: GPUs 0, 6, 8, 14, … are idle and tie; the lowest index wins.
    sixty_four = gpuslot("device", host="64x80g", check=0)
    assert sixty_four.stdout == "cuda:0\n" and len(sixty_four.stderr.splitlines()) == 65
    assert gpuslot("device", "cuda:63", host="64x80g", check=0).stdout == "cuda:63\n"


def test_uuid_spec_prints_this_process_ordinal(gpuslot, host):
    path = host("8x4090")
    uuid = read_host(path)["gpus"][1]["uuid"]
    result = gpuslot("device", uuid[:12], host=path, env={"CUDA_VISIBLE_DEVICES": "3,1"}, check=0)
    assert result.stdout == "cuda:1\n"
    hidden = gpuslot("device", uuid[:12], host=path, env={"CUDA_VISIBLE_DEVICES": "3"}, check=2)
    assert "CUDA_VISIBLE_DEVICES" in hidden.stderr.splitlines()[-1]
