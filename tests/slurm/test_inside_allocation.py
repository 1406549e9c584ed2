"""gpuslot inside real Slurm allocations (issue "Beyond one machine", part 1).

A one-node Slurm 22.05 with 4 fake GPUs (tests/slurm/slurm_cluster.py) runs batch jobs and srun
steps that call the built gpuslot on the fake NVML's 4-GPU host: Slurm sets CUDA_VISIBLE_DEVICES
and SLURM_JOB_GPUS / SLURM_STEP_GPUS itself, and the tests check that only the granted GPUs are
candidates and are marked, that a device beyond the allocation is bad input, and that several
`gpuslot run` in one allocation share its GPUs by memory exactly as on a plain host.

No cgroups here (task/none), so CUDA_VISIBLE_DEVICES holds the node's numbers; the renumbered
(ConstrainDevices) case is covered by tests/e2e/test_slurm_env.py with a host file modelling what
NVML shows inside a device cgroup.
"""
import json

from conftest import read_host, read_text, write_host

MiB = 1 << 20


def numbers(text):
    return [int(n) for n in text.strip().split(",") if n]


def busy_host(host, used_mib):
    """A copy of tests/hosts/4x24g.json with `used_mib` used on each GPU."""
    path = host("4x24g")
    data = read_host(path)
    for gpu, used in zip(data["gpus"], used_mib):
        gpu["memory_used_mib"] = used
    write_host(path, data)
    return path


def test_batch_job_candidates_are_the_granted_gpus(slurm_cluster, job_env, job_script, host, tmp_path):
    # GPU 3 is the emptiest: outside Slurm, `pick` would take it.
    used = [6000, 4000, 2000, 0]
    env = job_env(busy_host(host, used), OUT=tmp_path)
    # A job holding one GPU first, so that ours gets numbers other than 0,1.
    holder = slurm_cluster.sbatch("--gres=gpu:1", wrap='echo "$SLURM_JOB_GPUS" > "$OUT/holder"; sleep 60', env=env)
    slurm_cluster.wait_job(holder, states={"RUNNING"})
    job = slurm_cluster.sbatch("--gres=gpu:2", env=env, script=job_script("""
echo "$SLURM_JOB_GPUS" > "$OUT/job_gpus"
gpuslot status --json > "$OUT/status.json"
gpuslot status > "$OUT/status.txt"
gpuslot pick > "$OUT/pick"
rc=0; gpuslot pick --gpus 3 2> "$OUT/pick3.err" || rc=$?; echo $rc > "$OUT/pick3.rc"
srun gpuslot status --json > "$OUT/step.json"
"""))
    assert slurm_cluster.wait_job(job) == "COMPLETED", slurm_cluster.output(job)
    slurm_cluster.run("scancel", holder)

    granted = numbers(read_text(tmp_path / "job_gpus"))
    assert len(granted) == 2 and not set(granted) & set(numbers(read_text(tmp_path / "holder"))), granted
    status = json.loads(read_text(tmp_path / "status.json"))
    assert status["slurm"]["job_id"] == job
    assert status["slurm"]["source"] == "SLURM_JOB_GPUS" and status["slurm"]["matched_by"] == "minor_number"
    assert status["slurm"]["granted"] == granted and status["slurm"]["note"] is None
    assert [g["index"] for g in status["gpus"] if g["slurm_granted"]] == granted
    assert [g["index"] for g in status["gpus"] if g["visible"]] == granted  # CUDA_VISIBLE_DEVICES from Slurm
    best = min(granted, key=lambda index: used[index])
    assert status["recommended"] == best
    assert read_text(tmp_path / "pick").strip() == str(best)
    assert read_text(tmp_path / "pick3.rc").strip() == "1"
    assert "but only 2 usable GPUs are granted to Slurm job %s" % job in read_text(tmp_path / "pick3.err")
    text = read_text(tmp_path / "status.txt")
    assert "Slurm job %s granted GPUs %s" % (job, ",".join(map(str, granted))) in text
    marks = {int(line.split()[0]): line.split()[-1] for line in text.splitlines() if line[:1].isdigit()}
    assert marks == {i: ("granted" if i in granted else "-") for i in range(4)}

    step = json.loads(read_text(tmp_path / "step.json"))  # an srun step inside the batch job
    assert step["slurm"]["source"] == "SLURM_STEP_GPUS" and step["slurm"]["granted"] == granted


def test_device_beyond_the_allocation_is_bad_input(slurm_cluster, job_env, job_script, host, tmp_path):
    env = job_env(host("4x24g"), OUT=tmp_path)
    job = slurm_cluster.sbatch("--gres=gpu:2", env=env, script=job_script("""
rc=0; gpuslot device cuda:2 > "$OUT/cuda2.out" 2> "$OUT/cuda2.err" || rc=$?; echo $rc > "$OUT/cuda2.rc"
gpuslot device cuda:1 > "$OUT/cuda1.out"
"""))
    assert slurm_cluster.wait_job(job) == "COMPLETED", slurm_cluster.output(job)
    assert read_text(tmp_path / "cuda2.rc").strip() == "2"
    assert read_text(tmp_path / "cuda2.out") == ""
    assert read_text(tmp_path / "cuda2.err") == (
        "gpuslot: device cuda:2 does not exist: 2 GPUs are visible in Slurm job %s (cuda:0 to cuda:1)\n" % job)
    assert read_text(tmp_path / "cuda1.out") == "cuda:1\n"


RUNS = 5  # 10 GiB each on 2 GPUs of 24 GiB: 4 fit at once, the fifth waits


def share_script(job_script):
    return job_script("""
log="$OUT/runs.$SLURM_JOB_ID"
echo "$SLURM_JOB_GPUS" > "$OUT/gpus.$SLURM_JOB_ID"
for k in $(seq %d); do
  gpuslot run --mem 10G --wait 60s -- sh -c '
    echo "start $(date +%%s.%%N) $CUDA_VISIBLE_DEVICES" >> "$1"
    rc=0; fake-gpu-job --mem 10G --seconds 1.5 || rc=$?
    echo "end $(date +%%s.%%N) $CUDA_VISIBLE_DEVICES $rc" >> "$1"
    exit $rc' run "$log" &
done
failed=0
for pid in $(jobs -p); do wait "$pid" || failed=$((failed + 1)); done
echo "$failed" > "$OUT/failed.$SLURM_JOB_ID"
""" % RUNS)


def most_at_once(events, gpu):
    """The largest number of runs on `gpu` at the same moment (ends sort before starts)."""
    timeline = sorted((float(t), 0 if kind == "end" else 1) for kind, t, g, *_ in events if g == gpu)
    now = peak = 0
    for _, starting in timeline:
        now += 1 if starting else -1
        peak = max(peak, now)
    return peak


def test_runs_in_one_allocation_share_its_gpus_by_memory(slurm_cluster, job_env, job_script, host, tmp_path):
    """Two jobs of 2 GPUs each; in each, 5 `gpuslot run --mem 10G --wait`: Slurm keeps the jobs
    apart, gpuslot packs each job's runs by memory (never 3 on a 24 GiB GPU: fake-gpu-job would
    die of out-of-memory) and queues the fifth."""
    env = job_env(host("4x24g"), OUT=tmp_path)
    jobs = [slurm_cluster.sbatch("--gres=gpu:2", env=env, script=share_script(job_script)) for _ in range(2)]
    for job in jobs:
        assert slurm_cluster.wait_job(job, timeout=90) == "COMPLETED", slurm_cluster.output(job)

    granted = {job: numbers(read_text(tmp_path / ("gpus." + job))) for job in jobs}
    assert not set(granted[jobs[0]]) & set(granted[jobs[1]]), granted
    for job in jobs:
        assert read_text(tmp_path / ("failed." + job)).strip() == "0", slurm_cluster.output(job)
        events = [line.split() for line in read_text(tmp_path / ("runs." + job)).splitlines()]
        assert sum(1 for e in events if e[0] == "start") == RUNS
        assert all(e[3] == "0" for e in events if e[0] == "end"), events
        used = {e[2] for e in events}
        assert used <= {str(g) for g in granted[job]}, (used, granted[job])
        assert all(most_at_once(events, gpu) <= 2 for gpu in used), events
        # The fifth could not start before one of the first four ended.
        starts = sorted(float(e[1]) for e in events if e[0] == "start")
        ends = sorted(float(e[1]) for e in events if e[0] == "end")
        assert starts[-1] >= ends[0]


def test_shards_of_one_gpu_share_it_by_memory(slurm_cluster, job_env, job_script, host, tmp_path):
    """gres/shard: two 1-shard jobs get the same GPU (2 shards per GPU); their gpuslot runs share
    its memory through the host-wide ledger."""
    env = job_env(host("4x24g"), OUT=tmp_path)
    script = job_script("""
echo "$SLURM_JOB_GPUS" > "$OUT/gpus.$SLURM_JOB_ID"
gpuslot status --json > "$OUT/status.$SLURM_JOB_ID"
gpuslot run --mem 10G -- fake-gpu-job --mem 10G --seconds 2
""")
    jobs = [slurm_cluster.sbatch("--gres=shard:1", env=env, script=script) for _ in range(2)]
    for job in jobs:
        assert slurm_cluster.wait_job(job) == "COMPLETED", slurm_cluster.output(job)
    first, second = (numbers(read_text(tmp_path / ("gpus." + job))) for job in jobs)
    assert first == second and len(first) == 1
    for job in jobs:
        assert json.loads(read_text(tmp_path / ("status." + job)))["slurm"]["granted"] == first


def test_srun_steps(slurm_cluster, job_env, host):
    env = job_env(host("4x24g"))
    one = slurm_cluster.run("srun", "--gres=gpu:1", "sh", "-c", 'echo "$SLURM_STEP_GPUS"; gpuslot status --json',
                            env=env)
    assert one.returncode == 0, one.stderr
    step_gpus, document = one.stdout.split("\n", 1)
    status = json.loads(document)
    assert status["slurm"]["source"] == "SLURM_STEP_GPUS"
    assert status["slurm"]["granted"] == numbers(step_gpus) and len(numbers(step_gpus)) == 1

    # One GPU per task: each task's pick is its own GPU.
    tasks = slurm_cluster.run("srun", "-n2", "--gpus-per-task=1", "sh", "-c",
                              'echo "$SLURM_STEP_GPUS $(gpuslot pick)"', env=env)
    assert tasks.returncode == 0, tasks.stderr
    lines = sorted(tasks.stdout.split("\n")[:2])
    assert len(lines) == 2 and all(line.split()[0] == line.split()[1] for line in lines), lines
    assert lines[0].split()[0] != lines[1].split()[0]


def test_job_without_gpus_is_granted_none(slurm_cluster, job_env, job_script, host, tmp_path):
    env = job_env(host("4x24g"), OUT=tmp_path)
    job = slurm_cluster.sbatch(env=env, script=job_script("""
gpuslot device > "$OUT/device.out" 2> "$OUT/device.err"
"""))
    assert slurm_cluster.wait_job(job) == "COMPLETED", slurm_cluster.output(job)
    assert read_text(tmp_path / "device.out") == "cpu\n"
    assert "Slurm job %s was granted no GPU" % job in read_text(tmp_path / "device.err")
