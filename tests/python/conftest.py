"""Fixtures for the tests of the Python module `gpuslot`, driven through the fake NVML.

CTest runs every tests/python/test_*.py with GPUSLOT_BUILD_DIR set; by hand:

    GPUSLOT_BUILD_DIR=build /usr/bin/python3 -m pytest -q tests/python

The end-to-end fixtures (build_dir, host, fake_env, gpuslot, spawn, …) are tests/e2e/conftest.py's,
loaded from there rather than copied. Each test runs its Python code in fresh interpreters
(`python_run`, `python_spawn`): a process is what holds a lease, and NVML is opened once per
process, so one pytest process could not stand for several clients or several hosts.

Fixtures added here
    python_path    the importable package in the build tree (build_dir/python)
    python_env     python_env(host_path=None, **extra) -> fake_env(...) + PYTHONPATH
    python_run     python_run(code, host=None, env=None, check=0, timeout=60) -> CompletedProcess
                   (code is dedented; check=None accepts any exit status)
    python_spawn   python_spawn(code, host, env=None) -> Popen in its own session, output to files
                   (p.stdout_text(), p.stderr_text()); killed at teardown
"""
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_E2E_CONFTEST = Path(__file__).resolve().parents[1] / "e2e" / "conftest.py"
_spec = importlib.util.spec_from_file_location("gpuslot_e2e_conftest", _E2E_CONFTEST)
e2e = importlib.util.module_from_spec(_spec)
sys.modules["gpuslot_e2e_conftest"] = e2e
_spec.loader.exec_module(e2e)

# Re-exported fixtures (pytest finds fixtures among a conftest's attributes).
build_dir = e2e.build_dir
source_dir = e2e.source_dir
fake_nvml_path = e2e.fake_nvml_path
fake_gpu_job = e2e.fake_gpu_job
gpuslot_path = e2e.gpuslot_path
state_dir = e2e.state_dir
host = e2e.host
fake_env = e2e.fake_env
gpuslot = e2e.gpuslot
spawn = e2e.spawn
write_host_fixture = e2e.write_host_fixture

wait_until = e2e.wait_until
read_text = e2e.read_text
leases = e2e.leases
write_host = e2e.write_host
read_host = e2e.read_host

PYTHON = "/usr/bin/python3"  # Debian's, the interpreter the module is built for


@pytest.fixture(scope="session")
def python_path(build_dir):
    path = build_dir / "python"
    if not (path / "gpuslot" / "__init__.py").exists():
        pytest.fail("%s holds no gpuslot package (configure with GPUSLOT_BUILD_PYTHON=ON and build)" % path)
    return path


@pytest.fixture
def python_env(fake_env, python_path):
    def make(host_path=None, **extra):
        env = fake_env(host_path, **extra)
        env["PYTHONPATH"] = str(python_path) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    return make


@pytest.fixture
def python_run(python_env, host):
    copy_host = host

    def run(code, host=None, env=None, check=0, timeout=60):
        if isinstance(host, str):
            host = copy_host(host)
        completed = subprocess.run([PYTHON, "-c", textwrap.dedent(code)], env=python_env(host, **(env or {})),
                                   capture_output=True, text=True, timeout=timeout)
        if check is not None and completed.returncode != check:
            pytest.fail("python exited %d, expected %d\n--- stdout\n%s--- stderr\n%s"
                        % (completed.returncode, check, completed.stdout, completed.stderr))
        return completed

    return run


@pytest.fixture
def python_spawn(python_env, tmp_path):
    started = []

    def start(code, host, env=None):
        index = len(started)
        out_path, err_path = tmp_path / ("py%d.out" % index), tmp_path / ("py%d.err" % index)
        with open(out_path, "w") as out, open(err_path, "w") as err:
            process = subprocess.Popen([PYTHON, "-c", textwrap.dedent(code)], env=python_env(host, **(env or {})),
                                       stdout=out, stderr=err, start_new_session=True)
        process.stdout_text = lambda: read_text(out_path)
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
