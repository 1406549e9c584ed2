"""Inside a Slurm job, without Slurm: the variables a job step gets (SLURM_JOB_ID, SLURM_JOB_GPUS,
SLURM_STEP_GPUS, CUDA_VISIBLE_DEVICES), set by hand, observed through `status`, `pick`, `device`
and `run` on the fake NVML.

The rule (src/visibility/slurm_grant.cpp): the GPUs Slurm granted are those CUDA_VISIBLE_DEVICES
shows whose /dev/nvidiaN minor number Slurm lists; where that cannot be matched,
CUDA_VISIBLE_DEVICES alone, with a warning. A device-constrained job (cgroup ConstrainDevices) is
modelled the way NVML behaves in one: a host file that lists only the job's GPUs, renumbered from
0, with their host-wide minor numbers. tests/slurm runs the same commands under a real Slurm.
"""
import json

from conftest import read_host, read_text, write_host

GiB = 1 << 30


def job_env(gpus=None, cvd=None, step=None, job_id="12"):
    """The variables of a batch step granted `gpus` (SLURM_JOB_GPUS), or of an srun step (`step`)."""
    env = {"SLURM_JOB_ID": job_id, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    if gpus is not None:
        env["SLURM_JOB_GPUS"] = gpus
    if step is not None:
        env["SLURM_STEP_GPUS"] = step
    if cvd is not None:
        env["CUDA_VISIBLE_DEVICES"] = cvd
    return env


def status(gpuslot, host, env):
    return json.loads(gpuslot("status", "--json", host=host, env=env, check=0).stdout)


def make_busy(path, busy_mib):
    """memory_used_mib per GPU, so that "most free" would pick a GPU the job was not granted."""
    data = read_host(path)
    for gpu, used in zip(data["gpus"], busy_mib):
        gpu["memory_used_mib"] = used
    write_host(path, data)
    return path


def test_status_marks_the_granted_gpus(gpuslot, host):
    path = host("4x24g")
    data = status(gpuslot, path, job_env(gpus="1,2", cvd="1,2"))
    assert data["slurm"] == {"job_id": "12", "source": "SLURM_JOB_GPUS", "listed": "1,2", "numbers": [1, 2],
                             "granted": [1, 2], "matched_by": "minor_number", "note": None}
    assert [g["slurm_granted"] for g in data["gpus"]] == [False, True, True, False]
    assert [g["minor_number"] for g in data["gpus"]] == [0, 1, 2, 3]
    assert [g["cuda_ordinal"] for g in data["gpus"]] == [None, 0, 1, None]
    assert data["recommended"] in (1, 2)

    text = gpuslot("status", host=path, env=job_env(gpus="1,2", cvd="1,2"), check=0).stdout.splitlines()
    assert "Slurm job 12 granted GPUs 1,2 (SLURM_JOB_GPUS='1,2', matched by /dev/nvidiaN minor number)" in text
    rows = {line.split()[0]: line.split()[-1] for line in text if line[:1].isdigit()}
    assert rows == {"0": "-", "1": "granted", "2": "granted", "3": "-"}


def test_outside_a_job_status_has_no_slurm_fields(gpuslot, host):
    data = status(gpuslot, host("4x24g"), {"SLURM_JOB_GPUS": "1"})  # no SLURM_JOB_ID: not a job
    assert data["slurm"] is None and all(g["slurm_granted"] is None for g in data["gpus"])
    text = gpuslot("status", host="4x24g", check=0).stdout
    assert "SLURM" not in text and "Slurm" not in text


def test_pick_never_leaves_the_grant_even_with_cuda_visible_devices_unset(gpuslot, host):
    # GPUs 0 and 3 are empty, 1 and 2 half full: "most free" alone would take 0.
    path = make_busy(host("4x24g"), [0, 12000, 11000, 0])
    result = gpuslot("pick", "--explain", host=path, env=job_env(gpus="1,2"), check=0)
    assert result.stdout == "2\n"
    assert "GPU 0 (NVIDIA GeForce RTX 3090) = cuda:0: not a candidate: not granted to Slurm job 12" in result.stderr
    assert "gpuslot: warning: this process can also see GPUs 0,3, which Slurm job 12 was not granted" in result.stderr
    both = gpuslot("pick", "--gpus", "2", host=path, env=job_env(gpus="1,2"), check=0)
    assert both.stdout == "2,1\n"
    three = gpuslot("pick", "--gpus", "3", host=path, env=job_env(gpus="1,2"), check=1)
    assert "but only 2 usable GPUs are granted to Slurm job 12" in three.stderr


def test_step_gpus_win_over_job_gpus(gpuslot, host):
    data = status(gpuslot, host("4x24g"), job_env(gpus="1,2", step="2", cvd="2"))
    assert data["slurm"]["source"] == "SLURM_STEP_GPUS" and data["slurm"]["granted"] == [2]


def test_device_cgroup_model_renumbered_from_zero(gpuslot, host, write_host, tmp_path):
    """ConstrainDevices: NVML sees only the job's two GPUs (host minors 2 and 3) as 0 and 1, and
    CUDA_VISIBLE_DEVICES restarts at 0; Slurm still says 2,3."""
    full = read_host(host("4x24g"))
    inside = {**full, "gpus": [dict(full["gpus"][2], minor_number=2), dict(full["gpus"][3], minor_number=3)]}
    path = tmp_path / "cgroup-2-3.json"
    write_host(path, inside)
    env = job_env(gpus="2,3", cvd="0,1")
    data = status(gpuslot, path, env)
    assert data["slurm"]["granted"] == [0, 1] and data["slurm"]["matched_by"] == "minor_number"
    assert [g["minor_number"] for g in data["gpus"]] == [2, 3]
    assert gpuslot("device", "cuda:1", host=path, env=env, check=0).stdout == "cuda:1\n"

    out = tmp_path / "child"
    gpuslot("run", "--mem", "1G", "--", "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES" > "$OUT"', host=path,
            env={**env, "OUT": out}, check=0)
    assert read_text(out).strip() in ("0", "1")


def test_device_beyond_the_grant_is_bad_input(gpuslot, host):
    result = gpuslot("device", "cuda:2", host="4x24g", env=job_env(gpus="1,2", cvd="1,2"), check=2)
    assert result.stdout == ""
    assert result.stderr == "gpuslot: device cuda:2 does not exist: 2 GPUs are visible in Slurm job 12 (cuda:0 to cuda:1)\n"
    # With CUDA_VISIBLE_DEVICES unset, cuda:0 exists for CUDA but is not the job's.
    outside = gpuslot("device", "cuda:0", host="4x24g", env=job_env(gpus="1,2"), check=2)
    assert outside.stderr.splitlines()[-1] == "gpuslot: device cuda:0 is GPU 0, which Slurm job 12 was not granted"


def test_job_without_gpus_gets_none(gpuslot, host):
    path = host("4x24g")
    auto = gpuslot("device", host=path, env=job_env(), check=0)
    assert auto.stdout == "cpu\n"
    assert "Slurm job 12 was granted no GPU (neither SLURM_STEP_GPUS nor SLURM_JOB_GPUS is set)" in auto.stderr
    pick = gpuslot("pick", host=path, env=job_env(), check=1)
    assert "but only 0 usable GPUs are granted to Slurm job 12" in pick.stderr
    needed = gpuslot("device", "cuda", host=path, env=job_env(), check=3)
    assert needed.stderr.splitlines()[-1] == "gpuslot: device cuda needs a GPU, but Slurm job 12 was granted none"
    # The documented way out on a node whose GPUs Slurm does not manage.
    assert gpuslot("pick", host=path, env=job_env(cvd="3"), check=0).stdout == "3\n"


def test_unmatchable_numbers_fall_back_to_cuda_visible_devices(gpuslot, host):
    # Device files not in PCI order (GPU 0 is /dev/nvidia2 ...): Slurm's 0,1 match no visible GPU.
    path = host("4x24g")
    data = read_host(path)
    for gpu, minor in zip(data["gpus"], [2, 3, 0, 1]):
        gpu["minor_number"] = minor
    write_host(path, data)
    result = gpuslot("pick", host=path, env=job_env(gpus="0,1", cvd="0,1"), check=0)
    assert result.stdout in ("0\n", "1\n")
    assert "SLURM_JOB_GPUS='0,1' names no visible GPU by /dev/nvidiaN minor number" in result.stderr
    assert status(gpuslot, path, job_env(gpus="0,1", cvd="0,1"))["slurm"]["matched_by"] == "cuda_visible_devices"


def test_malformed_gpu_list_is_one_warning_and_cuda_visible_devices(gpuslot, host):
    result = gpuslot("pick", host="4x24g", env=job_env(gpus="1,\nx", cvd="3"), check=0)
    assert result.stdout == "3\n"
    warning = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warning == ["gpuslot: warning: SLURM_JOB_GPUS='1,\\x0ax' is not a list of GPU numbers (expected e.g. 0,1 "
                       "or 0-3); following CUDA_VISIBLE_DEVICES alone"]


def test_run_children_stay_inside_the_grant(gpuslot, host, tmp_path):
    path = host("4x24g")
    seen = []
    for k in range(3):
        out = tmp_path / ("child%d" % k)
        gpuslot("run", "--mem", "20G", "--", "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES" > "$OUT"', host=path,
                env={**job_env(gpus="1,3"), "OUT": out}, check=0)
        seen.append(read_text(out).strip())
    assert set(seen) <= {"1", "3"}


def test_duplicate_minor_numbers_are_a_bad_host_file(gpuslot, host):
    path = host("4x24g")
    data = read_host(path)
    data["gpus"][1]["minor_number"] = 0
    write_host(path, data)
    result = gpuslot("--simulate", path, "status", check=2)
    assert "gpus[1].minor_number: same as gpus[0] (one device file per GPU)" in result.stderr
