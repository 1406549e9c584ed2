"""`gpuslot batch --executor slurm` against a real one-node Slurm 22.05 (tests/slurm/slurm_cluster.py).

Each job of a jobs file becomes one Slurm job running `gpuslot run` on the fake NVML's 4-GPU host.
Covered: Slurm job ids in the journal and in --status; the Slurm job's name, comment, GPU request
and the user's sbatch options; a job that runs out of GPU memory on its first attempt and is
resubmitted, with its dependant (already pending on it with afterok) repointed to the new attempt;
a dependency chain; a group pinned to its first job's node; a dependency that fails for good and
its dependant cancelled; no room on the GPU Slurm gave counted as out of memory; kill -9 of the
scheduler right after sbatch answered and while sbatch is still running, then --resume, with every
attempt submitted exactly once and every job run exactly once; Ctrl-C leaving submitted jobs to
Slurm (and a job the user then cancels counting as failed); bad options and a missing sbatch as
one-line errors.

The cluster has no accounting (AccountingStorageType=accounting_storage/none) and MinJobAge=300,
so every job of the session stays listed by `squeue --states=all`: that is how submissions are
counted here.
"""
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time

import pytest

from conftest import read_host, read_text, wait_until, write_host

POLL = "0.3s"  # squeue every 0.3 s: these tests wait on Slurm, not on gpuslot


def write_jobs(path, jobs):
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def batch(gpuslot_path, env, *args, check=None, timeout=120):
    completed = subprocess.run([str(gpuslot_path), "batch", *map(str, args)], env=env, capture_output=True, text=True,
                               timeout=timeout)
    if check is not None and completed.returncode != check:
        pytest.fail("gpuslot batch %s exited %d, expected %d\n--- stdout\n%s--- stderr\n%s"
                    % (" ".join(map(str, args)), completed.returncode, check, completed.stdout, completed.stderr))
    return completed


def status(gpuslot_path, env, journal):
    shown = batch(gpuslot_path, env, "--status", journal, "--json", check=0)
    return {job["name"]: job for job in json.loads(shown.stdout)["jobs"]}


def batch_id(journal):
    with sqlite3.connect("file:%s?mode=ro" % journal, uri=True) as db:
        return db.execute("SELECT value FROM meta WHERE key='batch_id'").fetchone()[0]


def slurm_jobs(cluster, journal):
    """{Slurm job name: [ids]} of this batch's jobs, as slurmctld knows them (all, ended too)."""
    suffix = ".gpuslot-" + batch_id(journal)
    listed = cluster.run("squeue", "-h", "--states=all", "-o", "%i|%j").stdout.split()
    found = {}
    for line in listed:
        job_id, name = line.split("|", 1)
        if name.endswith(suffix):
            found.setdefault(name, []).append(job_id)
    return found


def scontrol(cluster, job_id):
    line = cluster.run("scontrol", "show", "job", "-o", job_id).stdout
    return dict(field.split("=", 1) for field in line.split() if "=" in field)


def test_jobs_become_slurm_jobs_with_retries_dependencies_and_groups(slurm_cluster, job_env, host, fake_gpu_job,
                                                                     gpuslot_path, tmp_path):
    env = job_env(host("4x24g"))
    oom_once = ('echo "attempt $GPUSLOT_JOB_ATTEMPT on $CUDA_VISIBLE_DEVICES, seed $SEED"; '
                'if [ "$GPUSLOT_JOB_ATTEMPT" = 1 ]; then '
                'echo "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" >&2; exit 1; fi')
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"name": "a", "cmd": [str(fake_gpu_job), "--mem", "6G", "--seconds", "1"], "mem": "6G"},
        {"name": "b", "cmd": oom_once, "mem": "1G", "env": {"SEED": "it's 7"}},
        {"name": "c", "cmd": 'echo "c after a and b, seed $SEED"', "after": ["a", "b"], "mem": "1G"},
        {"name": "d", "cmd": "echo 'no good' >&2; exit 3", "mem": "1G"},
        {"name": "e", "cmd": "echo never", "after": ["d"]},
        {"name": "g1", "cmd": [str(fake_gpu_job), "--mem", "2G", "--seconds", "1.5"], "mem": "2G", "group": "G"},
        {"name": "g2", "cmd": "echo $CUDA_VISIBLE_DEVICES", "group": "G", "gpus": 2},
    ])
    started = time.monotonic()
    result = batch(gpuslot_path, env, jobs, "--executor", "slurm", "--poll-interval", POLL,
                   "--sbatch-arg=--time=10", "--sbatch-arg=--cpus-per-task=1", check=1)
    elapsed = time.monotonic() - started
    journal = str(jobs) + ".gpuslot.db"
    found = status(gpuslot_path, env, journal)
    assert {name: job["state"] for name, job in found.items()} == {
        "a": "succeeded", "b": "succeeded", "c": "succeeded", "d": "failed", "e": "failed", "g1": "succeeded",
        "g2": "succeeded"}, result.stderr
    assert "5 succeeded, 2 failed" in result.stdout

    # Every attempt was one Slurm job, submitted once, named after the job and the attempt.
    submitted = slurm_jobs(slurm_cluster, journal)
    suffix = ".gpuslot-" + batch_id(journal)
    expected = {"%s.%d%s" % (name, attempt, suffix) for name, job in found.items()
                for attempt in range(1, job["attempts"] + 1)}
    assert set(submitted) == expected and all(len(ids) == 1 for ids in submitted.values()), submitted
    for name, job in found.items():
        assert submitted["%s.%d%s" % (name, job["attempts"], suffix)] == [job["slurm_job_id"]]

    a = scontrol(slurm_cluster, found["a"]["slurm_job_id"])
    assert a["JobName"] == "a.1" + suffix and a["Comment"].startswith("gpuslot")
    assert a["TresPerNode"] == "gres:gpu:1" and a["TimeLimit"] == "00:10:00"  # the user's --sbatch-arg=--time=10
    assert scontrol(slurm_cluster, found["g2"]["slurm_job_id"])["TresPerNode"] == "gres:gpu:2"
    assert found["a"]["slurm_node"] == slurm_cluster.node and found["a"]["gpus"]

    # b ran out of GPU memory once and was resubmitted as a new Slurm job; its environment is the job's.
    b = found["b"]
    assert b["attempts"] == 2 and b["oom_failures"] == 1
    assert read_text(b["stdout"]) == "attempt 2 on %d, seed it's 7\n" % b["gpus"][0]
    first_b = submitted["b.1" + suffix][0]
    assert first_b != b["slurm_job_id"]
    assert scontrol(slurm_cluster, first_b)["JobState"] == "FAILED"
    # c was submitted at once with afterok on a and b's first attempt, repointed to b's second, and
    # ran after both (the run files' clocks: the jobs' own).
    c = found["c"]
    assert c["attempts"] == 1 and read_text(c["stdout"]) == "c after a and b, seed \n"
    assert c["started_at"] >= max(found["a"]["ended_at"], b["ended_at"])
    assert int(c["slurm_job_id"]) < int(b["slurm_job_id"]), "c was submitted before b's retry"
    # d failed for good (not an out-of-memory failure: not retried); e, pending behind it, was cancelled.
    assert found["d"]["exit_code"] == 3 and found["d"]["attempts"] == 1 and found["d"]["last_output"] == "no good"
    assert found["e"]["reason"] == "dependency 'd' failed"
    assert scontrol(slurm_cluster, found["e"]["slurm_job_id"])["JobState"] == "CANCELLED"
    assert not read_text(tmp_path / "jobs.jsonl.gpuslot.logs" / "e.1.out")
    # g2 waited for g1 to start and was sent to its node.
    g2 = scontrol(slurm_cluster, found["g2"]["slurm_job_id"])
    assert g2["ReqNodeList"] == found["g1"]["slurm_node"] == slurm_cluster.node
    assert len(read_text(found["g2"]["stdout"]).strip().split(",")) == 2

    # The progress lines and the summary name the Slurm jobs.
    assert "submitted b as Slurm job %s (attempt 2)" % b["slurm_job_id"] in result.stderr
    assert "requeued b: out of GPU memory in Slurm job %s" % first_b in result.stderr
    assert "SLURM JOB" in result.stdout
    table = batch(gpuslot_path, env, "--status", journal, check=0).stdout
    assert any(line.split()[:3] == ["b", "succeeded", b["slurm_job_id"]] for line in table.splitlines()), table
    assert elapsed < 40


def test_no_room_on_the_gpu_slurm_gave_is_retried_as_out_of_memory(slurm_cluster, job_env, host, gpuslot_path,
                                                                   fake_gpu_job, tmp_path):
    """Every GPU is nearly full outside Slurm: the job's `gpuslot run --wait 1s` finds no room, which
    counts as out of memory; once the memory is freed, the resubmitted attempt runs."""
    machine = host("4x24g")
    full = read_host(machine)
    for gpu in full["gpus"]:
        gpu["memory_used_mib"] = 24000
    write_host(machine, full)
    env = job_env(machine)
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"name": "big", "cmd": [str(fake_gpu_job), "--mem", "8G", "--seconds", "0.5"], "mem": "8G", "retries": 5}])
    journal = str(jobs) + ".gpuslot.db"
    with open(tmp_path / "batch.err", "w") as err:
        process = subprocess.Popen([str(gpuslot_path), "batch", str(jobs), "--executor", "slurm", "--poll-interval",
                                    POLL, "--gpu-wait", "1s"], env=env, stdout=subprocess.DEVNULL, stderr=err,
                                   start_new_session=True)
    try:
        wait_until(lambda: os.path.exists(journal) and status(gpuslot_path, env, journal)["big"]["oom_failures"] >= 1,
                   timeout=30, interval=0.2, what="the first out-of-memory failure")
        first = status(gpuslot_path, env, journal)["big"]
        assert "the GPU Slurm gave had no room for 8 GiB" in first["reason"], first
        for gpu in full["gpus"]:
            gpu["memory_used_mib"] = 0
        write_host(machine, full)
        assert process.wait(60) == 0, read_text(tmp_path / "batch.err")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    job = status(gpuslot_path, env, journal)["big"]
    assert job["state"] == "succeeded" and job["attempts"] >= 2 and job["oom_failures"] == job["attempts"] - 1


def sbatch_wrapper(tmp_path, body):
    """A directory holding an `sbatch` that runs `body` around the real one ($REAL)."""
    folder = tmp_path / "wrapper"
    folder.mkdir()
    script = folder / "sbatch"
    script.write_text("#!/bin/sh\nREAL=%s\ncount=$(( $(cat \"$COUNT\" 2>/dev/null || echo 0) + 1 ))\n"
                      "echo $count > \"$COUNT\"\n%s" % (shutil.which("sbatch"), body))
    script.chmod(0o755)
    return folder


@pytest.mark.parametrize("window", ["after_sbatch_answered", "while_sbatch_runs"])
def test_kill_9_between_submissions_then_resume_submits_nothing_twice(slurm_cluster, job_env, host, gpuslot_path,
                                                                     tmp_path, window):
    """The scheduler is SIGKILLed by its own (wrapped) sbatch on the 3rd submission: either right
    after the real sbatch answered, before the scheduler could journal the id, or before the real
    sbatch even ran (it runs 2 s later, holding the attempt's submission lock). --resume must find
    that job by its name (waiting for the lock first), and submit nothing twice."""
    if window == "after_sbatch_answered":
        body = 'out=$("$REAL" "$@"); rc=$?\n[ "$count" = 3 ] && kill -9 $PPID\necho "$out"; exit $rc\n'
    else:
        body = '[ "$count" = 3 ] && { kill -9 $PPID; sleep 2; }\nexec "$REAL" "$@"\n'
    wrapper = sbatch_wrapper(tmp_path, body)
    marks = tmp_path / "marks"
    marks.mkdir()
    names = ["k%d" % i for i in range(6)]
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"name": name, "cmd": 'echo "$SLURM_JOB_ID" >> "%s/%s"; sleep 0.5' % (marks, name), "mem": "1G"}
        for name in names] + [{"name": "last", "cmd": "true", "after": names}])
    journal = str(jobs) + ".gpuslot.db"
    env = job_env(host("4x24g"), COUNT=tmp_path / "count")
    env["PATH"] = "%s:%s" % (wrapper, env["PATH"])
    killed = batch(gpuslot_path, env, jobs, "--executor", "slurm", "--poll-interval", POLL)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    before = status(gpuslot_path, env, journal)
    unconfirmed = [name for name, job in before.items() if job["state"] == "running" and job["slurm_job_id"] is None]
    assert unconfirmed == ["k2"], before  # journaled as running, its Slurm job id never recorded

    resumed = batch(gpuslot_path, env, jobs, "--executor", "slurm", "--resume", "--poll-interval", POLL, check=0)
    assert "adopted k2 (its submission is not confirmed" in resumed.stderr
    assert "submitted k2 as Slurm job" in resumed.stderr and "found by its name" in resumed.stderr
    after = status(gpuslot_path, env, journal)
    assert all(job["state"] == "succeeded" and job["attempts"] == 1 for job in after.values()), after
    submitted = slurm_jobs(slurm_cluster, journal)
    assert sorted(submitted) == sorted("%s.1.gpuslot-%s" % (name, batch_id(journal)) for name in names + ["last"])
    assert all(len(ids) == 1 for ids in submitted.values()), submitted
    for name in names:  # and each ran exactly once, in the Slurm job the journal names
        assert read_text(marks / name).split() == [after[name]["slurm_job_id"]]


def test_ctrl_c_leaves_submitted_jobs_to_slurm_and_resume_adopts_them(slurm_cluster, job_env, host, gpuslot_path,
                                                                      tmp_path):
    env = job_env(host("4x24g"))
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"name": "s%d" % i, "cmd": "sleep 3", "mem": "1G"} for i in range(3)]
                      + [{"name": "after", "cmd": "true", "after": ["s0"]}])
    journal = str(jobs) + ".gpuslot.db"
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        process = subprocess.Popen([str(gpuslot_path), "batch", str(jobs), "--executor", "slurm", "--poll-interval",
                                    POLL], env=env, stdout=out, stderr=err, start_new_session=True)
    wait_until(lambda: read_text(tmp_path / "err").count("] submitted ") == 4, timeout=20, what="4 submissions")
    process.send_signal(signal.SIGINT)
    assert process.wait(20) == 130
    ids = [job["slurm_job_id"] for job in status(gpuslot_path, env, journal).values()]
    summary = read_text(tmp_path / "out")
    assert "interrupted (gpuslot batch %s --executor slurm --resume continues)" % jobs in summary
    assert "scancel " + " ".join(ids) in summary
    # Not cancelled: the jobs are the cluster's now.
    states = {scontrol(slurm_cluster, job_id)["JobState"] for job_id in ids}
    assert states <= {"PENDING", "RUNNING", "COMPLETING", "COMPLETED"}, states

    # The user cancels one (still pending behind s0) themselves: for gpuslot, a failed job.
    slurm_cluster.run("scancel", ids[3])

    resumed = batch(gpuslot_path, env, jobs, "--executor", "slurm", "--resume", "--poll-interval", POLL, check=1)
    assert resumed.stderr.count("] adopted ") == 4
    assert "] submitted " not in resumed.stderr
    after = status(gpuslot_path, env, journal)
    assert [job["slurm_job_id"] for job in after.values()] == ids
    assert [after["s%d" % i]["state"] for i in range(3)] == ["succeeded"] * 3
    assert after["after"]["state"] == "failed" and after["after"]["reason"] == "failed (ended by Slurm: CANCELLED)"
    assert all(len(found) == 1 for found in slurm_jobs(slurm_cluster, journal).values())


def test_bad_options_and_impossible_jobs(slurm_cluster, job_env, host, gpuslot_path, tmp_path):
    env = job_env(host("4x24g"))
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"name": "one", "cmd": "true"}])

    def one_line_error(args, code, message, environment=env):
        result = batch(gpuslot_path, environment, jobs, *args, check=code)
        errors = [line for line in result.stderr.splitlines() if line.startswith("gpuslot:")]
        assert len(errors) == 1 and message in errors[0], result.stderr
        return result

    one_line_error(["--executor", "lsf"], 2, "invalid --executor 'lsf': expected local or slurm")
    one_line_error(["--partition", "gpu"], 2, "--partition needs --executor slurm")
    one_line_error(["--sbatch-arg=--time=5"], 2, "--sbatch-arg needs --executor slurm")
    one_line_error(["--executor", "slurm", "--exclude", "1"], 2, "--exclude cannot be used with --executor slurm")
    no_slurm = dict(env, PATH=str(tmp_path / "nowhere"))
    one_line_error(["--executor", "slurm"], 2, "sbatch is not on PATH", no_slurm)
    assert not os.path.exists(str(jobs) + ".gpuslot.db"), "nothing may be journaled before Slurm is there"

    # The batch's own Slurm options are wrong: stop, keep the job queued, resume with good ones.
    one_line_error(["--executor", "slurm", "--partition", "nope"], 2,
                   "sbatch refused job 'one': invalid partition specified: nope (nothing more is submitted")
    assert status(gpuslot_path, env, str(jobs) + ".gpuslot.db")["one"]["state"] == "queued"
    batch(gpuslot_path, env, jobs, "--executor", "slurm", "--resume", "--partition", "debug", "--poll-interval", POLL,
          check=0)
    one_line_error(["--resume"], 2, "is a batch run with --executor slurm; resume it with --executor slurm")

    # A job no node can hold fails alone, with Slurm's reason; the others run.
    jobs = write_jobs(tmp_path / "more.jsonl", [{"name": "huge", "cmd": "true", "gpus": 8}, {"name": "fine", "cmd": "true"}])
    result = batch(gpuslot_path, env, jobs, "--executor", "slurm", "--poll-interval", POLL, check=1)
    found = status(gpuslot_path, env, str(jobs) + ".gpuslot.db")
    assert found["fine"]["state"] == "succeeded"
    assert found["huge"]["state"] == "failed"
    assert found["huge"]["reason"] == "Slurm cannot run it: Requested node configuration is not available"
    assert "FAILED huge: Slurm cannot run it" in result.stderr
