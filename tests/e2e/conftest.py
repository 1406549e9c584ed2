"""Shared fixtures for the end-to-end tests: the built gpuslot binary driven through the fake NVML.

CTest runs every tests/e2e/test_*.py with GPUSLOT_BUILD_DIR (and GPUSLOT_SOURCE_DIR) set; by hand:

    GPUSLOT_BUILD_DIR=build /usr/bin/python3 -m pytest -q tests/e2e

Fixtures
    build_dir       Path of the build tree (skips the test when GPUSLOT_BUILD_DIR is unset)
    source_dir      Path of the source tree
    fake_nvml_path  the fake libnvidia-ml.so.1 (build_dir/libexec/gpuslot)
    fake_gpu_job    the fake-gpu-job program (same directory)
    gpuslot_path    the gpuslot binary (build_dir/bin/gpuslot)
    state_dir       a private GPUSLOT_STATE_DIR for this test (not created: gpuslot creates it)
    host            host("8x4090") copies tests/hosts/8x4090.json (or examples/hosts/…) into the
                    test's tmp_path and returns the copy's Path; tests may rewrite it freely
    fake_env        fake_env(host_path, **extra) -> environment dict for a child process using
                    the fake NVML (extra=None removes a variable)
    gpuslot         gpuslot(*args, host=..., env=..., input=None, check=None) -> CompletedProcess
    write_host      write_host(path, dict): atomic rewrite of a host file (also importable)
    spawn           spawn(*argv, host=Path, env={}, program=None) -> Popen of a background gpuslot
                    (or of `argv` itself with program=True), in its own session; killed at teardown

Importable helpers: wait_until, read_text, leases, wait_for_leases, wait_waiting.
"""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

# Variables from the caller's shell that would change what gpuslot or a job sees. Each test
# starts from none of them and sets what it needs, so a developer's CUDA_VISIBLE_DEVICES or a
# real GPUSLOT_STATE_DIR cannot leak into (or out of) a test.
_SCRUBBED_PREFIXES = ("GPUSLOT_", "CUDA_", "NVIDIA_", "SLURM_")


def write_host(path, host):
    """Replaces the host file at `path` with `host` (a dict) atomically: temp file + os.replace.

    The fake NVML re-reads a host file whenever it is replaced, so a running gpuslot sees the
    new state on its next query and never a half-written file."""
    path = Path(path)
    temp = path.with_name(".%s.tmp.%d" % (path.name, os.getpid()))
    temp.write_text(json.dumps(host, indent=2) + "\n")
    os.replace(temp, path)


def read_host(path):
    """The host file at `path` as a dict (to modify and pass back to write_host)."""
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def build_dir():
    value = os.environ.get("GPUSLOT_BUILD_DIR")
    if not value:
        pytest.skip("GPUSLOT_BUILD_DIR is not set: run through ctest, or set it to the build tree")
    return Path(value).resolve()


@pytest.fixture(scope="session")
def source_dir():
    value = os.environ.get("GPUSLOT_SOURCE_DIR")
    return Path(value).resolve() if value else Path(__file__).resolve().parents[2]


def _built(path):
    if not path.exists():
        pytest.fail("%s was not built (build the default target first)" % path)
    return path


@pytest.fixture(scope="session")
def fake_nvml_path(build_dir):
    return _built(build_dir / "libexec" / "gpuslot" / "libnvidia-ml.so.1")


@pytest.fixture(scope="session")
def fake_gpu_job(build_dir):
    return _built(build_dir / "libexec" / "gpuslot" / "fake-gpu-job")


@pytest.fixture(scope="session")
def gpuslot_path(build_dir):
    return _built(build_dir / "bin" / "gpuslot")


@pytest.fixture
def state_dir(tmp_path):
    return tmp_path / "state"


@pytest.fixture
def host(tmp_path, source_dir):
    """host(name) -> Path of a private copy of tests/hosts/<name>.json or examples/hosts/<name>.json."""

    def copy(name):
        file_name = name if name.endswith(".json") else name + ".json"
        for folder in (source_dir / "tests" / "hosts", source_dir / "examples" / "hosts"):
            if (folder / file_name).exists():
                target = tmp_path / file_name
                shutil.copyfile(folder / file_name, target)
                return target
        raise FileNotFoundError("no host file %s in tests/hosts or examples/hosts" % file_name)

    return copy


@pytest.fixture
def fake_env(fake_nvml_path, state_dir):
    """fake_env(host_path=None, **extra) -> a clean environment using the fake NVML.

    host_path None means a machine without an NVIDIA driver (the fake's init then fails with
    DRIVER_NOT_LOADED). NO_COLOR is set so output is stable; pass NO_COLOR=None to drop it."""

    def make(host_path=None, **extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
        env["GPUSLOT_NVML_LIBRARY"] = str(fake_nvml_path)
        env["GPUSLOT_STATE_DIR"] = str(state_dir)
        env["NO_COLOR"] = "1"
        if host_path is not None:
            env["GPUSLOT_FAKE_NVML_HOST"] = str(host_path)
        for key, value in extra.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return env

    return make


@pytest.fixture
def gpuslot(gpuslot_path, fake_env, host):
    """gpuslot(*args, host=None, env=None, input=None, check=None, timeout=60) -> CompletedProcess.

    host: a Path from the `host` fixture, or a host name ("8x4090") to copy; None = no driver.
    env: extra variables (None as a value removes one). check: None, True (exit 0) or the exact
    expected exit status; a mismatch fails with the command's stdout and stderr."""

    copy_host = host  # the fixture; `host` below is the caller's argument

    def run(*args, host=None, env=None, input=None, check=None, timeout=60):
        if isinstance(host, str):
            host = copy_host(host)
        environment = fake_env(host, **(env or {}))
        completed = subprocess.run(
            [str(gpuslot_path), *map(str, args)],
            env=environment,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        expected = 0 if check is True else check
        if expected is not None and completed.returncode != expected:
            pytest.fail(
                "gpuslot %s exited %d, expected %d\n--- stdout\n%s--- stderr\n%s"
                % (" ".join(map(str, args)), completed.returncode, expected, completed.stdout, completed.stderr)
            )
        return completed

    return run


@pytest.fixture(name="write_host")
def write_host_fixture():
    return write_host


def wait_until(predicate, timeout=10.0, interval=0.02, what="condition"):
    """Polls `predicate` until it returns something true (returned) or fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def read_text(path):
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return ""


def lease_file(state_dir, lease_id):
    """The file of lease `lease_id`: lease-<id>.json, or lease-<id>.r<bytes>.g<index>-<tag>….json
    where the name says what the lease reserves."""
    found = [path for path in Path(state_dir).glob("lease-%s.*" % lease_id)
             if path.name == "lease-%s.json" % lease_id or path.name.startswith("lease-%s.r" % lease_id)]
    assert len(found) == 1, (lease_id, sorted(p.name for p in Path(state_dir).iterdir()))
    return found[0]


def leases(gpuslot, host):
    """The live leases as `gpuslot leases --json` lists them."""
    return json.loads(gpuslot("leases", "--json", host=host, check=0).stdout)["leases"]


def wait_for_leases(gpuslot, host, count):
    return wait_until(lambda: (lambda found: found if len(found) == count else None)(leases(gpuslot, host)),
                      what="%d lease(s)" % count)


def wait_waiting(process):
    """Until a `run --wait` process has announced that it waits (so it holds its queue ticket)."""
    wait_until(lambda: "waiting:" in process.stderr_text(), what="'waiting:' from pid %d" % process.pid)


@pytest.fixture
def spawn(gpuslot_path, fake_env, tmp_path):
    """spawn(*argv, host=Path, env={}, program=None) -> Popen in its own session; argv are
    gpuslot's arguments unless `program` is given (then argv is the whole command). Output goes
    to files (p.out_path, p.err_path; p.stderr_text()). Every group started is SIGKILLed at
    teardown."""
    started = []

    def start(*args, host, env=None, program=None):
        index = len(started)
        out_path, err_path = tmp_path / ("bg%d.out" % index), tmp_path / ("bg%d.err" % index)
        argv = [*map(str, args)] if program else [str(gpuslot_path), *map(str, args)]
        with open(out_path, "w") as out, open(err_path, "w") as err:
            process = subprocess.Popen(argv, env=fake_env(host, **(env or {})), stdout=out, stderr=err,
                                       start_new_session=True)
        process.out_path, process.err_path = out_path, err_path
        process.stderr_text = lambda: read_text(err_path)
        started.append(process)
        return process

    yield start
    for process in started:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
