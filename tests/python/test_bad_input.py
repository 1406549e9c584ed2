"""Every bad argument is a typed exception with a one-line message that says what is accepted;
nothing is reserved by a call that fails."""
import json

import pytest

CASES = [
    # (call, exception, words the message must contain)
    ("gpuslot.select_best_gpu(-1)", "BadInput", "expected a number of GiB"),
    ("gpuslot.select_best_gpu('8G')", "BadInput", "expected a number of GiB"),
    ("gpuslot.select_best_gpu(float('nan'))", "BadInput", "expected a number of GiB"),
    ("gpuslot.select_best_gpu(8, strategy='fastest')", "BadInput", "expected most-free, least-used, least-busy or pack"),
    ("gpuslot.select_best_gpu(8, exclude_gpus=[9])", "BadInput", "4 GPUs are visible"),
    ("gpuslot.select_best_gpu(8, exclude_gpus=[-1])", "BadInput", "expected CUDA ordinals"),
    ("gpuslot.select_best_gpu(8, exclude_gpus=['GPU-zz'])", "BadInput", "GPU-zz"),
    ("gpuslot.resolve_device('gpu:1')", "BadInput", "expected auto, cuda, cuda:N, cpu or GPU-<uuid>"),
    ("gpuslot.resolve_device(3)", "BadInput", "expected auto, cuda, cuda:N, cpu or GPU-<uuid>"),
    ("gpuslot.resolve_device('cuda:4')", "BadInput", "does not exist"),
    ("gpuslot.lease(mem='8X')", "BadInput", "like 512M, 8G"),
    ("gpuslot.lease(mem=None)", "BadInput", "expected a size"),
    ("gpuslot.lease(gpus=0)", "BadInput", "expected a whole number from 1"),
    ("gpuslot.lease(gpus=5, wait=False)", "NoGpuAvailable", "only 4 usable GPUs are visible"),
    ("gpuslot.lease(timeout=-1)", "BadInput", "expected seconds"),
    ("gpuslot.lease(timeout='soon')", "BadInput", "timeout"),
    ("gpuslot.lease(device='cpu')", "BadInput", "asks for no GPU"),
    ("gpuslot.lease(max_utilization=101)", "BadInput", "0 to 100"),
    ("gpuslot.parse_size('-4G')", "BadInput", "like 512M, 8G"),
    ("gpuslot.WorkerPool(None, 'not callable')", "BadInput", "work must be callable"),
    ("gpuslot.WorkerPool(None, len, mem='lots')", "BadInput", "like 512M, 8G"),
    ("gpuslot.WorkerPool(None, len, gpus=0)", "BadInput", "from 1 to 1024"),
    ("gpuslot.WorkerPool(None, len, retries=-1)", "BadInput", "from 0 to 1024"),
    ("gpuslot.WorkerPool(None, len, strategy='x')", "BadInput", "expected most-free"),
    ("gpuslot.WorkerPool(None, len, gpus=5).map([1])", "BadInput", "needs as many GPUs, but 4 are visible"),
    # Values Python's float() cannot hold, and types that are not lists, are bad input too.
    ("gpuslot.select_best_gpu(10**400)", "BadInput", "expected a number of GiB from 0"),
    ("gpuslot.resolve_device(min_free_memory_gb=10**400)", "BadInput", "expected a number of GiB from 0"),
    ("gpuslot.lease(timeout=2**2000)", "BadInput", "expected seconds"),
    ("gpuslot.WorkerPool(None, len, timeout=10**400)", "BadInput", "expected seconds"),
    ("gpuslot.select_best_gpu(1, exclude_gpus=1.0)", "BadInput", "exclude_gpus"),
    ("gpuslot.WorkerPool(None, len, strategy=None)", "BadInput", "expected most-free"),
]


@pytest.mark.parametrize("call,exception,words", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_a_typed_one_line_error(call, exception, words, python_run, host, gpuslot):
    host_path = host("4x24g")
    out = python_run("""
        import gpuslot
        try:
            %s
        except gpuslot.GpuslotError as error:
            print(type(error).__name__)
            print(repr(str(error)))
            print(isinstance(error, ValueError))
        else:
            print("no error")
    """ % call, host=host_path).stdout.splitlines()
    assert out[0] == exception, out
    message = eval(out[1])  # the repr keeps any newline visible
    assert "\n" not in message and words in message, message
    assert out[2] == str(exception == "BadInput")
    assert json.loads(gpuslot("leases", "--json", host=host_path, check=0).stdout)["leases"] == []


def test_unusable_state_directory(python_run, host, tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    out = python_run("""
        import gpuslot
        try:
            gpuslot.select_best_gpu(1)
        except gpuslot.StateDirectoryError as error:
            print(error.exit_code, isinstance(error, OSError))
    """, host=host("4x24g"), env={"GPUSLOT_STATE_DIR": not_a_directory}).stdout.split()
    assert out == ["4", "True"]


def test_a_corrupt_host_file_is_reported_not_crashed_on(python_run, host):
    host_path = host("4x24g")
    host_path.write_text("{ not json")
    out = python_run("""
        import gpuslot
        try:
            gpuslot.select_best_gpu(1)
        except gpuslot.GpuslotError as error:
            print(type(error).__name__)
    """, host=host_path, check=0).stdout.split()
    assert out == ["NvmlUnavailable"]
