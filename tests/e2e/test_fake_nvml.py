"""The fake NVML and fake-gpu-job honour the contract every other e2e test relies on.

The fake is loaded here with ctypes, the way pynvml loads the real library, and held to NVML's
documented behaviour (shared/reference/nvml-abi.md): struct layouts, return codes, the process
list size query, the memory v2 version check. If the fake drifted from the real library, every
test built on it would be testing the wrong thing.
"""
import ctypes
import signal
import subprocess
import time

import pytest

from conftest import read_host, write_host

SUCCESS, UNINITIALIZED, INVALID_ARGUMENT, NOT_SUPPORTED = 0, 1, 2, 3
NOT_FOUND, INSUFFICIENT_SIZE, DRIVER_NOT_LOADED = 6, 7, 9
FUNCTION_NOT_FOUND, GPU_IS_LOST, UNKNOWN = 13, 15, 999
MEMORY_V2 = 0x02000028
MiB, GiB = 1 << 20, 1 << 30


class Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class MemoryV2(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint), ("total", ctypes.c_ulonglong), ("reserved", ctypes.c_ulonglong),
                ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class ProcessV1(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]


class ProcessV2(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]


class PciInfo(ctypes.Structure):
    _fields_ = [("busIdLegacy", ctypes.c_char * 16), ("domain", ctypes.c_uint), ("bus", ctypes.c_uint),
                ("device", ctypes.c_uint), ("pciDeviceId", ctypes.c_uint), ("pciSubSystemId", ctypes.c_uint),
                ("busId", ctypes.c_char * 32)]


class Utilization(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


@pytest.fixture(scope="session")
def nvml_library(fake_nvml_path):
    lib = ctypes.CDLL(str(fake_nvml_path))
    lib.nvmlErrorString.restype = ctypes.c_char_p
    lib.nvmlErrorString.argtypes = [ctypes.c_int]
    lib.nvmlDeviceGetHandleByIndex_v2.argtypes = [ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
    lib.nvmlDeviceGetHandleByUUID.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.nvmlDeviceGetHandleByPciBusId_v2.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    for name in ("nvmlDeviceGetUUID", "nvmlDeviceGetName"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint]
    for name, record in (("nvmlDeviceGetComputeRunningProcesses_v3", ProcessV2),
                         ("nvmlDeviceGetComputeRunningProcesses_v2", ProcessV2),
                         ("nvmlDeviceGetComputeRunningProcesses", ProcessV1),
                         ("nvmlDeviceGetGraphicsRunningProcesses_v3", ProcessV2)):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(record)]
    for name, out in (("nvmlDeviceGetMemoryInfo", Memory), ("nvmlDeviceGetMemoryInfo_v2", MemoryV2),
                      ("nvmlDeviceGetPciInfo_v3", PciInfo), ("nvmlDeviceGetUtilizationRates", Utilization),
                      ("nvmlDeviceGetPowerUsage", ctypes.c_uint), ("nvmlDeviceGetIndex", ctypes.c_uint)):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.POINTER(out)]
    lib.nvmlDeviceGetTemperature.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.POINTER(ctypes.c_uint)]
    return lib


@pytest.fixture
def nvml(nvml_library, monkeypatch):
    """The library with no host selected; the test points GPUSLOT_FAKE_NVML_HOST where it wants.
    Init is reference counted per process, so teardown shuts down whatever the test left open."""
    monkeypatch.delenv("GPUSLOT_FAKE_NVML_HOST", raising=False)
    yield nvml_library
    while nvml_library.nvmlShutdown() == SUCCESS:
        pass


def use_host(monkeypatch, path):
    monkeypatch.setenv("GPUSLOT_FAKE_NVML_HOST", str(path))


def handle(nvml, index):
    device = ctypes.c_void_p()
    assert nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(device)) == SUCCESS
    return device


def memory(nvml, device):
    info = MemoryV2(version=MEMORY_V2)
    assert nvml.nvmlDeviceGetMemoryInfo_v2(device, ctypes.byref(info)) == SUCCESS
    return info


def processes(nvml, device):
    """[(pid, bytes)] through the size-query-then-fill sequence pynvml and Slurm use."""
    count = ctypes.c_uint(0)
    rc = nvml.nvmlDeviceGetComputeRunningProcesses_v3(device, ctypes.byref(count), None)
    if rc == SUCCESS:
        return []
    assert rc == INSUFFICIENT_SIZE
    records = (ProcessV2 * count.value)()
    assert nvml.nvmlDeviceGetComputeRunningProcesses_v3(device, ctypes.byref(count), records) == SUCCESS
    return [(r.pid, r.usedGpuMemory) for r in records[: count.value]]


def test_struct_layouts_match_nvml_abi():
    assert ctypes.sizeof(Memory) == 24
    assert ctypes.sizeof(MemoryV2) == 40 and MemoryV2.total.offset == 8
    assert ctypes.sizeof(ProcessV1) == 16
    assert ctypes.sizeof(ProcessV2) == 24 and ProcessV2.gpuInstanceId.offset == 16
    assert ctypes.sizeof(PciInfo) == 68 and PciInfo.busId.offset == 36


def test_values_land_in_the_right_fields(nvml, host, monkeypatch):
    use_host(monkeypatch, host("8x4090"))
    assert nvml.nvmlInit_v2() == SUCCESS
    count = ctypes.c_uint()
    assert nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == SUCCESS and count.value == 8
    gpu0 = handle(nvml, 0)
    info = memory(nvml, gpu0)
    assert (info.total, info.reserved, info.used) == (24564 * MiB, 0, 21739 * MiB)  # 21.23 GiB
    assert info.free == info.total - info.used
    v1 = Memory()
    assert nvml.nvmlDeviceGetMemoryInfo(gpu0, ctypes.byref(v1)) == SUCCESS
    assert (v1.total, v1.free, v1.used) == (info.total, info.free, info.used)
    pci = PciInfo()
    assert nvml.nvmlDeviceGetPciInfo_v3(handle(nvml, 7), ctypes.byref(pci)) == SUCCESS
    assert (pci.busId, pci.busIdLegacy, pci.bus, pci.pciDeviceId) == (b"00000000:E1:00.0", b"0000:E1:00.0", 0xE1,
                                                                       0x268410DE)
    records = (ProcessV2 * 4)()
    count = ctypes.c_uint(4)
    assert nvml.nvmlDeviceGetComputeRunningProcesses_v3(gpu0, ctypes.byref(count), records) == SUCCESS
    assert count.value == 3
    assert [(r.pid, r.usedGpuMemory // MiB) for r in records[:3]] == [(1863729, 14872), (1863730, 4614),
                                                                        (1863731, 2018)]
    assert all(r.gpuInstanceId == r.computeInstanceId == 0xFFFFFFFF for r in records[:3])
    legacy = (ProcessV1 * 4)()
    count = ctypes.c_uint(4)
    assert nvml.nvmlDeviceGetComputeRunningProcesses(gpu0, ctypes.byref(count), legacy) == SUCCESS
    assert [r.pid for r in legacy[:3]] == [1863729, 1863730, 1863731]


def test_uninitialized_before_init_and_after_final_shutdown(nvml, host, monkeypatch):
    use_host(monkeypatch, host("1x4090"))
    count = ctypes.c_uint()
    assert nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == UNINITIALIZED
    assert nvml.nvmlShutdown() == UNINITIALIZED
    assert nvml.nvmlInit_v2() == SUCCESS
    assert nvml.nvmlInitWithFlags(0) == SUCCESS
    assert nvml.nvmlShutdown() == SUCCESS
    assert nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == SUCCESS  # still one reference
    assert nvml.nvmlShutdown() == SUCCESS
    assert nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == UNINITIALIZED
    assert nvml.nvmlErrorString(UNINITIALIZED) == b"Uninitialized"
    assert nvml.nvmlErrorString(GPU_IS_LOST) == b"GPU is lost"
    assert nvml.nvmlErrorString(4242) == b"Unknown Error"


def test_init_failures(nvml, host, monkeypatch, tmp_path, capfd):
    assert nvml.nvmlInit_v2() == DRIVER_NOT_LOADED  # no host file: a machine without the driver
    use_host(monkeypatch, host("init_fails"))
    assert nvml.nvmlInit_v2() == DRIVER_NOT_LOADED
    assert nvml.nvmlInitWithFlags(0) == DRIVER_NOT_LOADED
    broken = tmp_path / "broken.json"
    broken.write_text('{"driver_version": "550.54.15", "gpus": [')
    use_host(monkeypatch, broken)
    assert nvml.nvmlInit() == UNKNOWN
    assert str(broken) in capfd.readouterr().err


def test_memory_v2_requires_the_struct_version(nvml, host, monkeypatch):
    use_host(monkeypatch, host("1x4090"))
    assert nvml.nvmlInit_v2() == SUCCESS
    info = MemoryV2(version=2)  # what the header comment suggests; real drivers refuse it
    assert nvml.nvmlDeviceGetMemoryInfo_v2(handle(nvml, 0), ctypes.byref(info)) == FUNCTION_NOT_FOUND
    info.version = MEMORY_V2
    assert nvml.nvmlDeviceGetMemoryInfo_v2(handle(nvml, 0), ctypes.byref(info)) == SUCCESS
    assert info.used == 235 * MiB


def test_process_list_size_query_convention(nvml, host, monkeypatch):
    use_host(monkeypatch, host("8x4090"))
    assert nvml.nvmlInit_v2() == SUCCESS
    busy, idle = handle(nvml, 0), handle(nvml, 1)
    count = ctypes.c_uint(0)
    assert nvml.nvmlDeviceGetComputeRunningProcesses_v3(idle, ctypes.byref(count), None) == SUCCESS
    assert count.value == 0
    assert nvml.nvmlDeviceGetComputeRunningProcesses_v3(busy, ctypes.byref(count), None) == INSUFFICIENT_SIZE
    assert count.value == 3
    small = (ProcessV2 * 1)()
    count.value = 1
    assert nvml.nvmlDeviceGetComputeRunningProcesses_v3(busy, ctypes.byref(count), small) == INSUFFICIENT_SIZE
    assert count.value == 3
    count.value = 5  # a non-zero count promises an array
    assert nvml.nvmlDeviceGetComputeRunningProcesses_v3(busy, ctypes.byref(count), None) == INVALID_ARGUMENT
    assert nvml.nvmlDeviceGetComputeRunningProcesses_v3(busy, None, None) == INVALID_ARGUMENT
    count.value = 0
    assert nvml.nvmlDeviceGetGraphicsRunningProcesses_v3(busy, ctypes.byref(count), None) == SUCCESS


def test_string_getters_and_lookups(nvml, host, monkeypatch):
    path = host("8x4090")
    use_host(monkeypatch, path)
    uuid = read_host(path)["gpus"][3]["uuid"].encode()
    assert nvml.nvmlInit_v2() == SUCCESS
    buffer = ctypes.create_string_buffer(96)
    assert nvml.nvmlDeviceGetUUID(handle(nvml, 3), buffer, len(uuid)) == INSUFFICIENT_SIZE  # no room for NUL
    assert nvml.nvmlDeviceGetUUID(handle(nvml, 3), buffer, len(uuid) + 1) == SUCCESS and buffer.value == uuid
    assert nvml.nvmlDeviceGetUUID(handle(nvml, 3), None, 96) == INVALID_ARGUMENT
    device, index = ctypes.c_void_p(), ctypes.c_uint()
    assert nvml.nvmlDeviceGetHandleByIndex_v2(8, ctypes.byref(device)) == INVALID_ARGUMENT
    assert nvml.nvmlDeviceGetHandleByUUID(uuid, ctypes.byref(device)) == SUCCESS
    assert nvml.nvmlDeviceGetIndex(device, ctypes.byref(index)) == SUCCESS and index.value == 3
    assert nvml.nvmlDeviceGetHandleByUUID(uuid[:12], ctypes.byref(device)) == NOT_FOUND  # no prefixes in NVML
    assert nvml.nvmlDeviceGetHandleByPciBusId_v2(b"0000:61:00.0", ctypes.byref(device)) == SUCCESS
    assert nvml.nvmlDeviceGetIndex(device, ctypes.byref(index)) == SUCCESS and index.value == 3
    assert nvml.nvmlDeviceGetIndex(ctypes.c_void_p(0x1234), ctypes.byref(index)) == INVALID_ARGUMENT


def test_lost_gpu_answers_gpu_is_lost(nvml, host, monkeypatch):
    use_host(monkeypatch, host("lost"))
    assert nvml.nvmlInit_v2() == SUCCESS
    lost = handle(nvml, 2)  # still enumerated
    assert nvml.nvmlDeviceGetMemoryInfo_v2(lost, ctypes.byref(MemoryV2(version=MEMORY_V2))) == GPU_IS_LOST
    assert nvml.nvmlDeviceGetUUID(lost, ctypes.create_string_buffer(96), 96) == GPU_IS_LOST
    count = ctypes.c_uint(0)
    assert nvml.nvmlDeviceGetComputeRunningProcesses_v3(lost, ctypes.byref(count), None) == GPU_IS_LOST
    assert memory(nvml, handle(nvml, 3)).total == 81920 * MiB


def test_missing_sensors_are_not_supported(nvml, host, monkeypatch):
    use_host(monkeypatch, host("no_utilization"))
    assert nvml.nvmlInit_v2() == SUCCESS
    value = ctypes.c_uint()
    assert nvml.nvmlDeviceGetUtilizationRates(handle(nvml, 0), ctypes.byref(Utilization())) == SUCCESS
    assert nvml.nvmlDeviceGetUtilizationRates(handle(nvml, 1), ctypes.byref(Utilization())) == NOT_SUPPORTED
    assert nvml.nvmlDeviceGetTemperature(handle(nvml, 1), 0, ctypes.byref(value)) == NOT_SUPPORTED
    assert nvml.nvmlDeviceGetPowerUsage(handle(nvml, 1), ctypes.byref(value)) == NOT_SUPPORTED


# A process already running trusts its last look at the host file for 1 ms (kLibraryRecheckNs):
# an edit is seen by the first call after that.
RECHECK_SECONDS = 0.002


def test_host_file_is_reread_live(nvml, host, monkeypatch):
    path = host("1x4090")
    use_host(monkeypatch, path)
    assert nvml.nvmlInit_v2() == SUCCESS
    assert memory(nvml, handle(nvml, 0)).used == 235 * MiB
    state = read_host(path)
    for used in (1000, 2000, 3000):  # rapid rewrites of the same size must all be seen
        state["gpus"][0]["memory_used_mib"] = used
        write_host(path, state)
        time.sleep(RECHECK_SECONDS)
        assert memory(nvml, handle(nvml, 0)).used == used * MiB
    state["gpus"].append(dict(state["gpus"][0], uuid="GPU-00000000-1111-2222-3333-444444444444",
                              pci_bus_id="00000000:02:00.0"))
    write_host(path, state)
    time.sleep(RECHECK_SECONDS)
    count = ctypes.c_uint()
    assert nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == SUCCESS and count.value == 2


# fake-gpu-job ---------------------------------------------------------------------------------

def run_job(fake_gpu_job, fake_env, host_path, *args, **env):
    return subprocess.run([str(fake_gpu_job), *args], env=fake_env(host_path, **env), capture_output=True,
                          text=True, timeout=60)


def start_job(fake_gpu_job, fake_env, host_path, *args, **env):
    """Starts a job and returns once it holds its memory (its first stdout line)."""
    job = subprocess.Popen([str(fake_gpu_job), *args], env=fake_env(host_path, **env), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    line = job.stdout.readline()
    assert line.startswith("fake-gpu-job: holding"), job.stderr.read()
    return job


def test_job_out_of_memory_prints_pytorch_error(fake_gpu_job, fake_env, host):
    result = run_job(fake_gpu_job, fake_env, host("1x4090"), "--mem", "30G")
    assert result.returncode == 1
    assert result.stderr == ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 30.00 GiB. GPU 0 has a "
                             "total capacity of 23.99 GiB of which 23.76 GiB is free.\n")


def test_job_allocation_is_a_process_until_killed(nvml, fake_gpu_job, fake_env, host, monkeypatch):
    path = host("1x4090")
    use_host(monkeypatch, path)
    assert nvml.nvmlInit_v2() == SUCCESS
    gpu = handle(nvml, 0)
    job = start_job(fake_gpu_job, fake_env, path, "--mem", "4G", "--seconds", "60")
    try:
        assert processes(nvml, gpu) == [(job.pid, 4 * GiB)]
        assert memory(nvml, gpu).used == 235 * MiB + 4 * GiB
        job.kill()  # SIGKILL: no chance to clean up; the fake must notice the death itself
        deadline = time.monotonic() + 5
        while processes(nvml, gpu) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert processes(nvml, gpu) == []  # gone even before the zombie is reaped
        assert memory(nvml, gpu).used == 235 * MiB
    finally:
        job.kill()
        job.wait()


def test_job_sigterm_gives_memory_back_and_dies_by_the_signal(fake_gpu_job, fake_env, host):
    path = host("1x4090")
    job = start_job(fake_gpu_job, fake_env, path, "--mem", "1G", "--seconds", "60")
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=10) == -signal.SIGTERM
    assert str(job.pid) not in (path.parent / (path.name + ".allocations")).read_text()


def test_herd_of_jobs_never_overcommits(fake_gpu_job, fake_env, host):
    path = host("4x24g")  # 24 GiB each: exactly two 10 GiB jobs fit per GPU
    jobs = [subprocess.Popen([str(fake_gpu_job), "--mem", "10G", "--seconds", "3"],
                             env=fake_env(path, CUDA_VISIBLE_DEVICES=i % 4), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(16)]
    results = [(job.wait(timeout=60), job.stdout.read(), job.stderr.read()) for job in jobs]
    succeeded = [r for r in results if r[0] == 0]
    failed = [r for r in results if r[0] == 1 and "torch.OutOfMemoryError: CUDA out of memory" in r[2]]
    assert (len(succeeded), len(failed)) == (8, 8), results


def test_job_exit_code_and_touch_file(fake_gpu_job, fake_env, host, tmp_path):
    touch = tmp_path / "ran"
    result = run_job(fake_gpu_job, fake_env, host("1x4090"), "--mem", "1G", "--seconds", "0.1", "--exit", "3",
                     "--touch", touch)
    assert result.returncode == 3
    assert len(touch.read_text().splitlines()) == 1


@pytest.mark.parametrize("size,shown", [("512M", "512.00 MiB"), ("0.5G", "512.00 MiB"), ("10GiB", "10.00 GiB"),
                                        ("8G", "8.00 GiB"), ("1000", "1000.00 MiB")])
def test_job_sizes(fake_gpu_job, fake_env, host, size, shown):
    result = run_job(fake_gpu_job, fake_env, host("1x4090"), "--mem", size, "--seconds", "0")
    assert result.returncode == 0 and ("holding %s on GPU-" % shown) in result.stdout


def test_job_rejects_a_bad_size(fake_gpu_job, fake_env, host):
    assert run_job(fake_gpu_job, fake_env, host("1x4090"), "--mem", "lots").returncode == 2


@pytest.mark.parametrize("visible,order,expected", [
    (None, None, 2),              # unset: cuda:0 is the fastest GPU (H100, compute capability 9.0)
    ("0", None, 2),               # FASTEST_FIRST numbering: 0 is the H100, not NVML index 0
    ("0", "PCI_BUS_ID", 0),       # PCI order: NVML index 0, the RTX 4090
    ("1,0", "PCI_BUS_ID", 1),     # the first entry is cuda:0
    ("2", None, 1),               # the slowest card, the A2000
])
def test_job_lands_where_cuda_would(fake_gpu_job, fake_env, host, visible, order, expected):
    path = host("mixed")
    env = {"CUDA_VISIBLE_DEVICES": visible, "CUDA_DEVICE_ORDER": order}
    result = run_job(fake_gpu_job, fake_env, path, "--mem", "1G", "--seconds", "0", **env)
    assert result.returncode == 0, result.stderr
    assert read_host(path)["gpus"][expected]["uuid"] in result.stdout


def test_job_accepts_uuid_prefixes(fake_gpu_job, fake_env, host):
    path = host("8x24g")
    uuid = read_host(path)["gpus"][5]["uuid"]
    for visible in (uuid, uuid[:12]):
        result = run_job(fake_gpu_job, fake_env, path, "--mem", "1G", "--seconds", "0", CUDA_VISIBLE_DEVICES=visible)
        assert result.returncode == 0 and uuid in result.stdout, result.stderr


@pytest.mark.parametrize("visible", ["", "-1", "NoDevFiles", "8", "0,0"])
def test_job_without_visible_gpus(fake_gpu_job, fake_env, host, visible):
    result = run_job(fake_gpu_job, fake_env, host("8x24g"), "--mem", "1G", CUDA_VISIBLE_DEVICES=visible)
    assert result.returncode == 1
    assert result.stderr == "RuntimeError: No CUDA GPUs are available\n"


def test_job_on_a_lost_gpu_fails_like_out_of_memory(fake_gpu_job, fake_env, host):
    result = run_job(fake_gpu_job, fake_env, host("lost"), "--mem", "1G", CUDA_VISIBLE_DEVICES="2")
    assert result.returncode == 1 and "of which 0 bytes is free." in result.stderr
