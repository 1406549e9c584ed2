"""Fixtures for the tests that run gpuslot under a real Slurm (tests/slurm/slurm_cluster.py).

CTest runs every tests/slurm/test_*.py as `slurm.<name>` (label `slurm`), with GPUSLOT_BUILD_DIR
set; by hand, as root:

    GPUSLOT_BUILD_DIR=build /usr/bin/python3 -m pytest -q -rs tests/slurm

Fixtures
    slurm_cluster   a running one-node cluster (4 fake GPUs, 2 shards each), one per test process;
                    skipped with the reason when that is impossible here (not root, Slurm not
                    installed) unless GPUSLOT_REQUIRE_SLURM=1, which turns the skip into a failure
                    (scripts/test-all.sh sets it when it runs as root: CI must not skip them)
    job_env         job_env(host_path, **extra) -> the environment to submit a job with: the fake
                    NVML on that host, a private GPUSLOT_STATE_DIR, gpuslot and fake-gpu-job on
                    PATH, this cluster's SLURM_CONF
    job_script      job_script(body) -> Path of an executable bash script (set -eu) holding `body`
    and the e2e fixtures: build_dir, source_dir, gpuslot_path, fake_nvml_path, fake_gpu_job, host,
    fake_env, state_dir, write_host

Importable: slurm_cluster.SlurmCluster (start/stop/sbatch/wait_job/output/run/cancel_all) for a
test that needs a cluster configured otherwise.

A test file whose every test was skipped exits 125, which CTest reports as skipped (not passed).
"""
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from slurm_cluster import SlurmCluster, SlurmStartError, unavailable_reason  # noqa: E402

# The e2e fixtures, loaded under their own module name (both files are "conftest").
_spec = importlib.util.spec_from_file_location("gpuslot_e2e_conftest", HERE.parent / "e2e" / "conftest.py")
e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e)
build_dir, source_dir, gpuslot_path = e2e.build_dir, e2e.source_dir, e2e.gpuslot_path
fake_nvml_path, fake_gpu_job, state_dir, host, fake_env = (e2e.fake_nvml_path, e2e.fake_gpu_job, e2e.state_dir,
                                                           e2e.host, e2e.fake_env)
write_host_fixture = e2e.write_host_fixture  # the `write_host` fixture
write_host, read_host, read_text, wait_until = e2e.write_host, e2e.read_host, e2e.read_text, e2e.wait_until


def skip_unless_slurm_can_run():
    """Skips the test with the reason Slurm cannot run here (not root, not installed) — or fails
    it where the suite requires Slurm (GPUSLOT_REQUIRE_SLURM=1, set by test-all.sh as root)."""
    reason = unavailable_reason()
    if reason:
        if os.environ.get("GPUSLOT_REQUIRE_SLURM") == "1":
            pytest.fail("GPUSLOT_REQUIRE_SLURM=1 but " + reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    skip_unless_slurm_can_run()
    cluster = SlurmCluster(tempfile.mkdtemp(prefix="gpuslot-slurm-", dir="/tmp"))
    try:
        cluster.start()
    except PermissionError as error:  # root without CAP_MKNOD (some containers)
        cluster.stop()
        if os.environ.get("GPUSLOT_REQUIRE_SLURM") == "1":
            raise
        pytest.skip("cannot make the fake GPU device files: %s" % error)
    except SlurmStartError as error:
        pytest.fail("the test Slurm cluster did not start: %s" % error)
    yield cluster
    cluster.stop()


@pytest.fixture
def job_env(fake_env, slurm_cluster, gpuslot_path, fake_gpu_job):
    def make(host_path, **extra):
        env = fake_env(host_path, **extra)
        env["PATH"] = "%s:%s:%s" % (gpuslot_path.parent, fake_gpu_job.parent, env.get("PATH", "/usr/bin:/bin"))
        env["SLURM_CONF"] = str(slurm_cluster.conf)
        return env

    return make


@pytest.fixture
def job_script(tmp_path):
    count = [0]

    def make(body):
        count[0] += 1
        path = tmp_path / ("job%d.sh" % count[0])
        path.write_text("#!/bin/bash\nset -eu\n" + body)
        path.chmod(0o755)
        return path

    return make


def pytest_sessionfinish(session, exitstatus):
    """All skipped -> 125, CTest's SKIP_RETURN_CODE for these tests: a run without Slurm shows as
    skipped, never as passed."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if exitstatus != 0 or reporter is None:
        return
    stats = reporter.stats
    if stats.get("skipped") and not any(stats.get(kind) for kind in ("passed", "failed", "error", "xpassed")):
        session.exitstatus = 125
