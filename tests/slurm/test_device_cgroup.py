"""gpuslot inside a Slurm job confined by ConstrainDevices (task/cgroup): the job can open only its
own GPU device files, CUDA_VISIBLE_DEVICES restarts at 0, SLURM_JOB_GPUS keeps the node's number.

Real NVML in such a job lists only the GPUs it can open, renumbered from 0 (gres.html; slurm-job-
exporter#63). The fake NVML has no cgroup of its own, so the job builds the host file NVML would
show from what the cgroup really allows: it tries to open every fake device file of the node —
EPERM means the cgroup denies it; any other outcome (ENXIO: allowed, but no driver behind major
195) means it is the job's — and keeps those GPUs, with their minor numbers. Needs a kernel and
container where slurmd can build device cgroups; skipped with the reason otherwise.
"""
import json
import os
import tempfile

import pytest

from conftest import read_text, skip_unless_slurm_can_run
from slurm_cluster import SlurmCluster, SlurmStartError

# Run inside the job: the node's devices it may open, as a host file NVML would describe.
NVML_VIEW = r"""
import errno, json, os, sys
full, devices, out = sys.argv[1:4]
host = json.load(open(full))
seen, allowed = [], []
for minor, gpu in enumerate(host["gpus"]):
    try:
        os.close(os.open(os.path.join(devices, "nvidia%d" % minor), os.O_RDONLY))
        outcome = "open"
    except OSError as error:
        outcome = errno.errorcode.get(error.errno, str(error.errno))
    seen.append(outcome)
    if outcome != "EPERM":
        allowed.append(dict(gpu, minor_number=minor))
json.dump(dict(host, gpus=allowed), open(out, "w"))
print(" ".join(seen))
"""


@pytest.fixture(scope="module")
def cgroup_cluster():
    skip_unless_slurm_can_run()
    cluster = SlurmCluster(tempfile.mkdtemp(prefix="gpuslot-slurm-cg-", dir="/tmp"), cgroup=True)
    try:
        cluster.start()
    except (SlurmStartError, OSError) as error:
        cluster.stop()
        pytest.skip("Slurm cannot confine devices with cgroups here: %s" % str(error).splitlines()[0])
    yield cluster
    cluster.stop()


def test_constrained_job_sees_its_gpu_renumbered(cgroup_cluster, fake_env, host, gpuslot_path, fake_gpu_job,
                                                 tmp_path):
    full = host("4x24g")
    view = tmp_path / "nvml_view.py"
    view.write_text(NVML_VIEW)
    env = fake_env(full, OUT=tmp_path, SLURM_CONF=cgroup_cluster.conf,
                   PATH="%s:%s:%s" % (gpuslot_path.parent, fake_gpu_job.parent, os.environ.get("PATH", "/usr/bin:/bin")))
    holder = cgroup_cluster.sbatch("--gres=gpu:1", wrap="sleep 60", env=env)
    cgroup_cluster.wait_job(holder, states={"RUNNING"})
    script = tmp_path / "job.sh"
    script.write_text("""#!/bin/bash
set -eu
echo "$SLURM_JOB_GPUS $CUDA_VISIBLE_DEVICES" > "$OUT/slurm"
python3 "$OUT/nvml_view.py" "$GPUSLOT_FAKE_NVML_HOST" %s "$OUT/inside.json" > "$OUT/opened"
export GPUSLOT_FAKE_NVML_HOST="$OUT/inside.json"
gpuslot status --json > "$OUT/status.json"
gpuslot device > "$OUT/device"
gpuslot run --mem 1G -- sh -c 'echo "$CUDA_VISIBLE_DEVICES" > "$OUT/child"'
""" % (cgroup_cluster.base / "dev"))
    script.chmod(0o755)
    job = cgroup_cluster.sbatch("--gres=gpu:1", script=script, env=env)
    state = cgroup_cluster.wait_job(job)
    cgroup_cluster.run("scancel", holder)
    assert state == "COMPLETED", cgroup_cluster.output(job)

    job_gpus, cvd = read_text(tmp_path / "slurm").split()
    opened = read_text(tmp_path / "opened").split()
    if "EPERM" not in opened:
        pytest.skip("the device cgroup denied nothing (opened: %s); cannot observe ConstrainDevices here" % opened)
    assert cvd == "0"  # renumbered
    minor = int(job_gpus)
    assert [i for i, outcome in enumerate(opened) if outcome != "EPERM"] == [minor]
    assert minor != 0  # the holder has nvidia0

    status = json.loads(read_text(tmp_path / "status.json"))
    assert [g["minor_number"] for g in status["gpus"]] == [minor]
    assert status["slurm"]["matched_by"] == "minor_number"
    assert status["slurm"]["granted"] == [0] and status["gpus"][0]["cuda_ordinal"] == 0
    assert read_text(tmp_path / "device") == "cuda:0\n"
    assert read_text(tmp_path / "child") == "0\n"
