"""`gpuslot batch`: a durable multi-GPU job queue, driven end to end through the fake NVML.

Covers: plain and JSON Lines jobs files and their up-front validation; placement through the
lease ledger (shared with `run`, respecting CUDA_VISIBLE_DEVICES); out-of-memory retry on another
GPU when a foreign process grabs memory mid-run; groups and `after`; a job that can never fit; a
failure that is not retried; Ctrl-C; and kill -9 of the scheduler at random moments followed by
--resume, with per-job completion markers proving every job completed exactly once.
"""
import json
import os
import random
import signal
import subprocess
import time

import pytest

from conftest import read_host, wait_until, write_host


def status(gpuslot, journal, host):
    result = gpuslot("batch", "--status", journal, "--json", host=host, check=0)
    return {job["name"]: job for job in json.loads(result.stdout)["jobs"]}


def write_jobs(path, jobs):
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


# --- jobs files ---------------------------------------------------------------------------------


def test_plain_file_runs_each_line_and_reports_every_job(gpuslot, host, tmp_path):
    machine = host("4x24g")
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("# a comment\necho one\n\necho two >&2; exit 3\nprintf '%s' \"$CUDA_VISIBLE_DEVICES\"\n")
    result = gpuslot("batch", jobs, "--mem", "1G", host=machine, check=1)
    assert "1 failed" in result.stdout and "2 succeeded" in result.stdout
    journal = str(jobs) + ".gpuslot.db"
    found = status(gpuslot, journal, machine)
    assert sorted(found) == ["job-2", "job-4", "job-5"]  # named by line number
    assert found["job-2"]["state"] == "succeeded" and found["job-2"]["exit_code"] == 0
    assert found["job-4"]["state"] == "failed" and found["job-4"]["exit_code"] == 3
    assert found["job-4"]["attempts"] == 1, "an ordinary failure is not retried"
    assert found["job-4"]["last_output"] == "two"
    assert open(found["job-2"]["stdout"]).read() == "one\n"
    # The child saw exactly the GPU it was given.
    assert open(found["job-5"]["stdout"]).read() == str(found["job-5"]["gpus"][0])


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"cmd": "true", "mem_gb": 8}'], "line 1: unknown field 'mem_gb'; accepted: name, cmd, mem"),
        (['{"cmd": "true"}', '{"cmd": "true", "mem": "8 bananas"}'], "line 2: \"mem\": invalid size"),
        (['{"name": "a", "cmd": "true"}', "", '{"name": "a", "cmd": "true"}'], "line 3: name 'a' is already used by line 1"),
        (['{"name": "a", "cmd": "true", "after": ["zz"]}'], "line 1: \"after\" names 'zz', which is no job"),
        (['{"name": "a", "cmd": "true", "after": ["b"]}', '{"name": "b", "cmd": "true", "after": ["a"]}'],
         "forms a cycle: a → b → a"),
        (['{"cmd": "true"', ], "line 1: not valid JSON"),
        (['{"cmd": []}'], 'line 1: "cmd" must be a string'),
        (['{"cmd": "true", "gpus": 0}'], '"gpus" must be a whole number from 1'),
        (['{"cmd": "true", "retries": {"oom": 2, "other": 1}}'], "unknown key 'other' in \"retries\""),
        (["# nothing but a comment", ""], "holds no jobs"),
    ],
)
def test_bad_jobs_files_are_rejected_up_front_with_the_line(gpuslot, host, tmp_path, lines, message):
    machine = host("4x24g")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(lines) + "\n")
    result = gpuslot("batch", jobs, host=machine, check=2)
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(str(jobs) + ".gpuslot.db"), "nothing may be journaled for a rejected file"


def test_resume_of_a_start_killed_before_its_journal_existed_runs_the_batch(gpuslot, host, tmp_path):
    # A scheduler makes its logs folder, then writes its journal; kill -9 between the two leaves
    # the folder (and its scheduler.lock) without a journal. Nothing of that batch ran.
    machine = host("4x24g")
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("echo one >> %s/marks\necho two >> %s/marks\n" % (tmp_path, tmp_path))
    logs = tmp_path / "jobs.txt.gpuslot.logs"
    logs.mkdir()
    (logs / "scheduler.lock").write_text("")
    resumed = gpuslot("batch", jobs, "--resume", host=machine, check=0)
    assert "2 succeeded, 0 failed" in resumed.stdout, resumed.stdout + resumed.stderr
    assert sorted((tmp_path / "marks").read_text().split()) == ["one", "two"]
    again = gpuslot("batch", jobs, "--resume", host=machine, check=0)
    assert (tmp_path / "marks").read_text().split().count("one") == 1, "a finished batch is not run again"


def test_resume_without_its_journal_never_reruns_a_batch_that_ran(gpuslot, host, tmp_path):
    machine = host("4x24g")
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("echo ran >> %s/marks\n" % tmp_path)
    # `--journal run.db` and `--journal run` share the logs folder run.logs: a typo must not
    # take the other batch's folder for a start that never got to write its journal.
    gpuslot("batch", jobs, "--journal", tmp_path / "run.db", host=machine, check=0)
    typo = gpuslot("batch", jobs, "--resume", "--journal", tmp_path / "run", host=machine, check=2)
    assert "holds files of a batch that ran; nothing to resume" in typo.stderr, typo.stderr
    assert [line for line in typo.stderr.splitlines() if line.startswith("gpuslot:")] == [typo.stderr.strip().splitlines()[-1]]
    # Nor a journal moved away from its logs.
    os.rename(tmp_path / "run.db", tmp_path / "elsewhere.db")
    moved = gpuslot("batch", jobs, "--resume", "--journal", tmp_path / "run.db", host=machine, check=2)
    assert "nothing to resume" in moved.stderr
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "run.db")
    assert (tmp_path / "marks").read_text().split() == ["ran"]


def test_journal_errors_are_one_line_with_distinct_exit_codes(gpuslot, host, tmp_path):
    machine = host("4x24g")
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("true\n")
    missing = gpuslot("batch", jobs, "--resume", host=machine, check=2)
    assert "nothing to resume" in missing.stderr
    assert not os.path.exists(str(jobs) + ".gpuslot.db")
    assert not os.path.exists(str(jobs) + ".gpuslot.logs"), "a refused --resume leaves nothing behind"
    gpuslot("batch", jobs, host=machine, check=0)
    again = gpuslot("batch", jobs, host=machine, check=4)
    assert "already exists: add --resume" in again.stderr
    jobs.write_text("true\nfalse\n")
    changed = gpuslot("batch", jobs, "--resume", host=machine, check=2)
    assert "differs from the one journal" in changed.stderr
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    corrupt = gpuslot("batch", "--status", garbage, host=machine, check=2)
    assert "not a gpuslot batch journal" in corrupt.stderr
    assert len(corrupt.stderr.strip().splitlines()) == 1


# --- placement ----------------------------------------------------------------------------------


def test_inherited_cuda_visible_devices_limits_the_gpus(gpuslot, host, tmp_path):
    machine = host("4x24g")
    jobs = write_jobs(tmp_path / "jobs.jsonl",
                      [{"name": "j%d" % i, "cmd": "echo $CUDA_VISIBLE_DEVICES $MINE", "mem": "10G",
                        # A job's own env is passed on, but cannot move it off the GPU it was given.
                        "env": {"MINE": "kept", "CUDA_VISIBLE_DEVICES": "0"}} for i in range(6)])
    gpuslot("batch", jobs, host=machine, check=0,
            env={"CUDA_VISIBLE_DEVICES": "2,3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    found = status(gpuslot, str(jobs) + ".gpuslot.db", machine)
    for job in found.values():
        assert job["gpus"][0] in (2, 3)
        assert open(job["stdout"]).read().strip() == "%d kept" % job["gpus"][0]


def test_packs_several_jobs_per_gpu_by_memory(gpuslot, host, tmp_path, fake_gpu_job):
    machine = host("4x24g")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"name": "j%d" % i, "cmd": [str(fake_gpu_job), "--mem", "5G", "--seconds", "1.5"], "mem": "5G"}
        for i in range(8)])
    gpuslot("batch", jobs, host=machine, check=0)
    found = status(gpuslot, str(jobs) + ".gpuslot.db", machine)
    # pack: four 5 GiB jobs fit on a 24 GiB GPU, so 8 jobs fill GPUs 0 and 1 only.
    assert sorted(job["gpus"][0] for job in found.values()) == [0, 0, 0, 0, 1, 1, 1, 1]


def test_largest_jobs_are_offered_room_first_and_order_file_keeps_file_order(gpuslot, host, tmp_path):
    # One 24 GiB GPU: three 6 GiB jobs, then one of 20 GiB that cannot share with any of them.
    machine = host("1x4090")
    jobs = write_jobs(tmp_path / "jobs.jsonl",
                      [{"name": "small%d" % i, "cmd": "sleep 0.3", "mem": "6G"} for i in range(3)] +
                      [{"name": "big", "cmd": "sleep 0.3", "mem": "20G"}])
    starts = {}
    for order in ("largest-first", "file"):
        journal = str(tmp_path / ("%s.db" % order))
        gpuslot("batch", jobs, "--order", order, "--journal", journal, host=machine, check=0)
        starts[order] = {name: job["started_at"] for name, job in status(gpuslot, journal, machine).items()}
    smalls = ["small0", "small1", "small2"]
    # Default: the 20 GiB job first (file order would leave a 6 GiB hole beside each wave).
    assert all(starts["largest-first"]["big"] < starts["largest-first"][name] for name in smalls), starts
    assert all(starts["file"]["big"] > starts["file"][name] for name in smalls), starts
    gpuslot("batch", jobs, "--journal", str(tmp_path / "default.db"), host=machine, check=0)
    found = status(gpuslot, str(tmp_path / "default.db"), machine)
    assert all(found["big"]["started_at"] < found[name]["started_at"] for name in smalls), "largest-first is the default"
    bad = gpuslot("batch", jobs, "--order", "random", host=machine, check=2)
    assert "invalid --order 'random': expected largest-first or file" in bad.stderr
    slurm = gpuslot("batch", jobs, "--order", "file", "--executor", "slurm", host=machine, check=2)
    assert "--order cannot be used with --executor slurm" in slurm.stderr


def test_a_group_is_offered_room_as_one_unit_so_its_big_member_is_not_crowded_out(gpuslot, host, tmp_path):
    # One 24 GiB GPU. The group's anchor needs 4 GiB, its second member 18 GiB; three 6 GiB jobs
    # follow. Offered as a unit at 18 GiB, both members start together; offered alone, the 18 GiB
    # member would wait for its anchor while the small jobs filled the GPU around it.
    machine = host("1x4090")
    jobs = write_jobs(tmp_path / "jobs.jsonl",
                      [{"name": "anchor", "cmd": "sleep 0.5", "mem": "4G", "group": "g"},
                       {"name": "big", "cmd": "sleep 0.5", "mem": "18G", "group": "g"}] +
                      [{"name": "small%d" % i, "cmd": "sleep 0.5", "mem": "6G"} for i in range(3)])
    gpuslot("batch", jobs, host=machine, check=0)
    found = status(gpuslot, str(jobs) + ".gpuslot.db", machine)
    for name in ("small0", "small1", "small2"):
        assert found["big"]["started_at"] < found[name]["started_at"], found
        assert found["anchor"]["started_at"] < found[name]["started_at"], found


def test_a_resumed_batch_keeps_the_order_it_started_with(gpuslot, host, tmp_path, spawn):
    import sqlite3
    machine = host("1x4090")
    logs = tmp_path / "jobs.jsonl.gpuslot.logs"
    trap = "trap 'exit 130' INT; echo ready; sleep 5 & wait"
    jobs = write_jobs(tmp_path / "jobs.jsonl",
                      [{"name": "small%d" % i, "cmd": trap, "mem": "6G"} for i in range(3)] +
                      [{"name": "big", "cmd": "true", "mem": "20G"}])
    batch = spawn("batch", jobs, "--order", "file", host=machine)
    wait_until(lambda: all((logs / ("small%d.1.out" % i)).exists() and "ready" in (logs / ("small%d.1.out" % i)).read_text()
                           for i in range(3)), what="three small jobs running")
    batch.send_signal(signal.SIGINT)
    assert batch.wait(timeout=20) == 130
    journal = str(jobs) + ".gpuslot.db"
    with sqlite3.connect(journal) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'order'").fetchone() == ("file",)
    for i in range(3):
        (logs / ("small%d.1.out" % i)).unlink()
    resumed = spawn("batch", jobs, "--resume", host=machine)  # no --order: the journal's
    wait_until(lambda: all((logs / ("small%d.2.out" % i)).exists() for i in range(3)), what="small jobs started again")
    found = status(gpuslot, journal, machine)
    assert found["big"]["state"] == "queued", "file order: the small jobs first, as when the batch started"
    resumed.send_signal(signal.SIGINT)
    assert resumed.wait(timeout=20) == 130


def test_batch_waits_for_a_run_lease_and_starts_when_it_is_released(gpuslot, host, tmp_path, spawn):
    machine = host("1x4090")
    run_end = tmp_path / "run-end"
    holder = spawn("run", "--mem", "20G", "--", "sh", "-c", "sleep 1; date +%%s.%%N > %s" % run_end, host=machine)
    wait_until(lambda: json.loads(gpuslot("leases", "--json", host=machine).stdout)["leases"], what="run's lease")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"name": "after-run", "cmd": "date +%s.%N", "mem": "10G"}])
    gpuslot("batch", jobs, host=machine, check=0)
    assert holder.wait(timeout=10) == 0
    found = status(gpuslot, str(jobs) + ".gpuslot.db", machine)
    started = float(open(found["after-run"]["stdout"]).read())
    assert started >= float(run_end.read_text()), "the batch job must not start while run's 20 GiB lease holds the GPU"
    assert found["after-run"]["attempts"] == 1


def test_out_of_memory_is_retried_on_another_gpu_when_a_foreign_process_grabs_memory(gpuslot, host, tmp_path,
                                                                                     fake_gpu_job, spawn):
    machine = host("4x24g")
    # Each job "loads its model" for a moment before allocating, as the seed's services do.
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"name": "j%d" % i, "cmd": "sleep 1.5; exec %s --mem 10G --seconds 0.5" % fake_gpu_job, "mem": "10G"}
        for i in range(8)])
    journal = str(jobs) + ".gpuslot.db"
    batch = spawn("batch", jobs, host=machine)
    wait_until(lambda: os.path.exists(journal) and
               sum(job["state"] == "running" for job in status(gpuslot, journal, machine).values()) == 8,
               what="8 running jobs")
    # A foreign process takes 20 GiB of GPU 0 while its two jobs are still loading.
    host_data = read_host(machine)
    host_data["gpus"][0]["processes"] = [{"pid": os.getpid(), "used_mib": 20480}]
    write_host(machine, host_data)
    assert batch.wait(timeout=60) == 0, batch.stderr_text()
    found = status(gpuslot, journal, machine)
    retried = [job for job in found.values() if job["oom_failures"] > 0]
    assert len(retried) == 2, found
    for job in retried:
        assert job["state"] == "succeeded" and job["attempts"] == 2
        assert job["gpus"] != [0], "the retry goes to another GPU first"
        first_err = open("%s.gpuslot.logs/%s.1.err" % (jobs, job["name"])).read()
        assert "CUDA out of memory" in first_err
        # The retry wrote nothing to stderr: that log is not kept.
        assert job["stderr"] is None and not os.path.exists("%s.gpuslot.logs/%s.2.err" % (jobs, job["name"]))
    assert "requeued" in batch.stderr_text() and "out of GPU memory on GPU 0" in batch.stderr_text()


def test_out_of_memory_retries_are_bounded_then_reported_with_output(gpuslot, host, tmp_path):
    machine = host("4x24g")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"name": "doomed", "cmd": "echo 'RuntimeError: CUDA error: out of memory'; "
                                  "echo 'torch.OutOfMemoryError: CUDA out of memory.' >&2; exit 1",
         "mem": "1G", "retries": 2},
        {"name": "fine", "cmd": "true", "mem": "1G"},
    ])
    result = gpuslot("batch", jobs, host=machine, check=1, env={})
    found = status(gpuslot, str(jobs) + ".gpuslot.db", machine)
    assert found["doomed"]["state"] == "failed" and found["doomed"]["attempts"] == 3
    assert found["doomed"]["oom_failures"] == 3
    assert "no retries left" in found["doomed"]["reason"]
    assert "OutOfMemoryError" in found["doomed"]["last_output"]
    assert found["fine"]["state"] == "succeeded", "one failure never stops the rest"
    assert "OutOfMemoryError" in result.stdout  # the summary shows the failed job's last lines


def test_oom_exit_code_and_failure_retries(gpuslot, host, tmp_path):
    machine = host("4x24g")
    counter = tmp_path / "count"
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"name": "exit42", "cmd": "echo x >> %s.a; [ $(wc -l < %s.a) -ge 2 ] || exit 42" % (counter, counter), "mem": "1G"},
        {"name": "flaky", "cmd": "echo x >> %s.b; [ $(wc -l < %s.b) -ge 3 ] || exit 5" % (counter, counter),
         "mem": "1G", "retries": {"failure": 2}},
    ])
    gpuslot("batch", jobs, "--oom-exit-code", "42", host=machine, check=0)
    found = status(gpuslot, str(jobs) + ".gpuslot.db", machine)
    assert found["exit42"]["oom_failures"] == 1 and found["exit42"]["attempts"] == 2
    assert found["flaky"]["oom_failures"] == 0 and found["flaky"]["attempts"] == 3


# --- groups, dependencies, jobs that can never fit ----------------------------------------------


def test_groups_share_a_gpu_and_after_waits_for_success(gpuslot, host, tmp_path, fake_gpu_job):
    machine = host("4x24g")
    stamp = "date +%s.%N"
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"name": "chunk-a", "cmd": "%s; sleep 0.3" % stamp, "mem": "8G", "group": "video1"},
        {"name": "chunk-b", "cmd": "%s; sleep 0.3" % stamp, "mem": "8G", "group": "video1"},
        {"name": "other", "cmd": "%s; sleep 0.3" % stamp, "mem": "20G"},
        {"name": "merge", "cmd": stamp, "mem": "2G", "group": "video1", "after": ["chunk-a", "chunk-b"]},
        {"name": "broken", "cmd": "exit 7", "mem": "1G"},
        {"name": "needs-broken", "cmd": "echo never", "after": ["broken"]},
        {"name": "needs-needs", "cmd": "echo never", "after": ["needs-broken"]},
        {"name": "too-big", "cmd": "echo never", "mem": "100G"},
        {"name": "too-many", "cmd": "echo never", "gpus": 5},
    ])
    result = gpuslot("batch", jobs, host=machine, check=1)
    found = status(gpuslot, str(jobs) + ".gpuslot.db", machine)
    group_gpus = {tuple(found[name]["gpus"]) for name in ("chunk-a", "chunk-b", "merge")}
    assert len(group_gpus) == 1, found
    merge_start = float(open(found["merge"]["stdout"]).read())
    assert merge_start >= max(found["chunk-a"]["ended_at"], found["chunk-b"]["ended_at"]) - 0.01
    assert found["broken"]["state"] == "failed"
    for name in ("needs-broken", "needs-needs"):
        assert found[name]["state"] == "failed" and found[name]["attempts"] == 0
    assert found["needs-broken"]["reason"] == "dependency 'broken' failed"
    assert found["needs-needs"]["reason"] == "dependency 'needs-broken' failed"
    assert found["too-big"]["state"] == "failed" and "can never fit" in found["too-big"]["reason"]
    assert "largest visible GPU has 24.00 GiB" in found["too-big"]["reason"]
    assert found["too-many"]["state"] == "failed" and "can never fit" in found["too-many"]["reason"]
    assert "5 succeeded" not in result.stdout and "4 succeeded, 5 failed" in result.stdout


def test_never_fitting_job_is_rejected_at_once_not_left_waiting(gpuslot, host, tmp_path, spawn):
    machine = host("4x24g")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"name": "long", "cmd": "sleep 3", "mem": "1G"},
        {"name": "too-big", "cmd": "echo never", "mem": "25G"},
    ])
    journal = str(jobs) + ".gpuslot.db"
    batch = spawn("batch", jobs, host=machine)
    wait_until(lambda: os.path.exists(journal) and status(gpuslot, journal, machine)["too-big"]["state"] == "failed",
               timeout=2.5, what="too-big failed while 'long' still runs")
    assert status(gpuslot, journal, machine)["long"]["state"] == "running"
    assert batch.wait(timeout=20) == 1


# --- interruption and crashes -------------------------------------------------------------------


def test_ctrl_c_stops_forwards_and_resume_finishes(gpuslot, host, tmp_path, spawn):
    machine = host("4x24g")
    marks = tmp_path / "marks"
    marks.mkdir()
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"name": "j%d" % i, "cmd": "trap 'echo got-int; exit 130' INT; echo ready; sleep 5 & wait; echo done > %s/j%d" % (marks, i),
         "mem": "10G"} for i in range(10)])
    journal = str(jobs) + ".gpuslot.db"
    batch = spawn("batch", jobs, host=machine)
    logs = tmp_path / "jobs.jsonl.gpuslot.logs"
    wait_until(lambda: sum("ready" in (logs / ("j%d.1.out" % i)).read_text()
                           for i in range(10) if (logs / ("j%d.1.out" % i)).exists()) == 8,
               what="8 running jobs with their trap set")
    batch.send_signal(signal.SIGINT)
    assert batch.wait(timeout=20) == 130
    found = status(gpuslot, journal, machine)
    assert all(job["state"] == "queued" for job in found.values()), [(j["name"], j["state"], j["reason"], j["exit_code"]) for j in found.values()]
    interrupted = [job for job in found.values() if job["attempts"] == 1]
    assert len(interrupted) == 8
    for job in interrupted:
        assert "got-int" in open(job["stdout"]).read(), "Ctrl-C is forwarded to running jobs"
    assert json.loads(gpuslot("leases", "--json", host=machine).stdout)["leases"] == []
    jobs_file_after = gpuslot("batch", jobs, "--resume", host=machine, check=0, timeout=60)
    assert "10 succeeded" in jobs_file_after.stdout
    assert sorted(os.listdir(marks)) == sorted("j%d" % i for i in range(10))


def test_kill_9_of_the_scheduler_at_random_moments_loses_nothing_and_runs_nothing_twice(gpuslot, host, tmp_path,
                                                                                        spawn, fake_gpu_job):
    machine = host("4x24g")
    marks = tmp_path / "marks"
    marks.mkdir()
    rng = random.Random(20261123)
    jobs = []
    for i in range(120):
        seconds = rng.choice([0.2, 0.4, 0.8, 1.0])
        # The marker is appended at the very end: a job that ran twice leaves two lines.
        jobs.append({"name": "j%02d" % i,
                     "cmd": "%s --mem 6G --seconds %s && echo $GPUSLOT_JOB_ATTEMPT >> %s/j%02d" %
                            (fake_gpu_job, seconds, marks, i),
                     "mem": "6G", "group": "g%d" % (i % 7) if i % 3 == 0 else None})
        if jobs[-1]["group"] is None:
            del jobs[-1]["group"]
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", jobs)
    journal = str(jobs_file) + ".gpuslot.db"

    logs = str(jobs_file) + ".gpuslot.logs"

    kills = 0
    while kills < 24:
        # A kill that lands before the start left any trace (no journal, no logs folder: slow
        # under ASan) ran nothing, and --resume rightly refuses a path where no batch started:
        # start afresh, as a person would.
        started = os.path.exists(journal) or os.path.exists(logs)
        if not started:
            assert list(marks.iterdir()) == [], "jobs ran with no journal"
        batch = spawn("batch", jobs_file, *(["--resume"] if started else []), host=machine)
        time.sleep(rng.uniform(0.02, 0.35))
        if batch.poll() is not None:
            assert batch.returncode == 0, batch.stderr_text()
            break
        os.kill(batch.pid, signal.SIGKILL)
        batch.wait()
        kills += 1
    assert kills >= 20, "the batch finished before 20 kills; make it longer"
    final = gpuslot("batch", jobs_file, "--resume", host=machine, check=0, timeout=120)
    assert "120 succeeded, 0 failed" in final.stdout, final.stdout + final.stderr
    found = status(gpuslot, journal, machine)
    assert all(job["state"] == "succeeded" for job in found.values())
    for name in found:
        lines = (marks / name).read_text().split()
        assert len(lines) == 1, "%s completed %d times (attempts %s)" % (name, len(lines), lines)
    # No out-of-memory: every job's lease held through crashes, so nothing was ever overcommitted.
    assert all(job["oom_failures"] == 0 for job in found.values())
    # Groups stayed together across crashes.
    by_group = {}
    for job in jobs:
        if "group" in job:
            by_group.setdefault(job["group"], set()).add(tuple(found[job["name"]]["gpus"]))
    assert all(len(gpus) == 1 for gpus in by_group.values()), by_group
    assert json.loads(gpuslot("leases", "--json", host=machine).stdout)["leases"] == []


def test_a_second_scheduler_on_the_same_journal_is_refused(gpuslot, host, tmp_path, spawn):
    machine = host("4x24g")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"name": "slow", "cmd": "sleep 2", "mem": "1G"}])
    journal = str(jobs) + ".gpuslot.db"
    first = spawn("batch", jobs, host=machine)
    wait_until(lambda: os.path.exists(journal) and status(gpuslot, journal, machine)["slow"]["state"] == "running",
               what="slow running")
    second = gpuslot("batch", jobs, "--resume", host=machine, check=4)
    assert "in use by another gpuslot batch" in second.stderr
    assert first.wait(timeout=20) == 0
