"""The lease ledger seen from outside: leases die with their holder (kill -9, pid reuse), files
in the state directory are never trusted blindly, `pick --hold` leases expire, `status --json`
charges reservations without counting memory twice, and an unusable state directory stops a
launch with one clear line.

Lease files are written by hand here in the on-disk format of src/lease/lease_file.cpp
(format 1), because that is what a crashed holder, a reused pid or a hostile user leaves behind.
"""
import fcntl
import json
import os
import signal
import subprocess
import time
import uuid as uuid_module

import pytest

from conftest import wait_until, read_text, leases, wait_for_leases

GiB = 1 << 30
MiB = 1 << 20
IS_ROOT = os.geteuid() == 0


# --- helpers ------------------------------------------------------------------------------------


def status(gpuslot, host):
    return json.loads(gpuslot("status", "--json", host=host, check=0).stdout)


def uuids_of(host_path):
    return [gpu["uuid"] for gpu in json.loads(host_path.read_text())["gpus"]]


def start_ticks(pid):
    """Field 22 of /proc/<pid>/stat, as src/lease/process_tree.cpp reads it."""
    text = open("/proc/%d/stat" % pid).read()
    return int(text[text.rindex(")") + 2:].split()[19])


def lease_record(gpu_uuid, reserved, holder_pid, ticks=None, uid=None, expires_in=None, command="by hand"):
    now_ms = int(time.time() * 1000)
    return {
        "format": 1,
        "id": "%d-%s" % (holder_pid, uuid_module.uuid4().hex[:8]),
        "holder_pid": holder_pid,
        "holder_start_ticks": start_ticks(holder_pid) if ticks is None else ticks,
        "uid": os.geteuid() if uid is None else uid,
        "user": "someone",
        "gpu_uuids": [gpu_uuid],
        "nvml_indices": [0],
        "reserved_bytes": reserved,
        "command": command,
        "taken_at_ms": now_ms,
        "expires_at_ms": None if expires_in is None else now_ms + int(expires_in * 1000),
    }


def write_lease(state_dir, record, text=None, mode=0o644):
    """Writes lease-<id>.json (creating the 1777 state directory as gpuslot would)."""
    if not state_dir.exists():
        state_dir.mkdir()
        os.chmod(state_dir, 0o1777)
    path = state_dir / ("lease-%s.json" % record["id"])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.write(fd, (json.dumps(record) + "\n" if text is None else text).encode())
    os.fchmod(fd, mode)
    os.close(fd)
    return path


def warning_lines(stderr):
    return [line for line in stderr.splitlines() if "warning" in line]


# --- holders that die ---------------------------------------------------------------------------


def test_kill_9_of_the_holder_releases_before_the_next_decision(gpuslot, spawn, host, tmp_path):
    host_path = host("1x4090")
    pid_file = tmp_path / "sleep.pid"
    holder = spawn("run", "--mem", "20G", "--", "sh", "-c", 'echo $$ > "$PIDFILE"; exec sleep 30', host=host_path,
                   env={"PIDFILE": pid_file})
    wait_for_leases(gpuslot, host_path, 1)
    assert gpuslot("pick", "--mem", "20G", host=host_path).returncode == 1  # the lease counts
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    sleeper = int(read_text(pid_file))
    assert os.path.exists("/proc/%d" % sleeper)  # the child lives on, but holds no GPU memory
    began = time.monotonic()
    picked = gpuslot("pick", "--mem", "20G", host=host_path, check=0)
    assert picked.stdout.strip() == "0" and time.monotonic() - began < 1.0
    assert leases(gpuslot, host_path) == []


def test_unlocked_lease_of_a_live_unrelated_pid_is_dead_and_removed(gpuslot, host, state_dir):
    """The holder died and its pid now belongs to someone else (here: this pytest process, with
    the very start time a holder would record). No lock is held, so the lease is dead: it must not
    be revived by the pid being alive."""
    host_path = host("1x4090")
    path = write_lease(state_dir, lease_record(uuids_of(host_path)[0], 20 * GiB, os.getpid()))
    assert gpuslot("pick", "--mem", "20G", host=host_path, check=0).stdout.strip() == "0"
    assert leases(gpuslot, host_path) == []
    assert not path.exists()


@pytest.mark.parametrize("liveness", ["held lock", "hold expiry"])
def test_memory_of_a_reused_pid_is_not_the_holders(gpuslot, spawn, fake_gpu_job, host, state_dir, liveness):
    """A live lease whose holder pid now names another process (start time differs) must not
    have that process's GPU memory subtracted from its reservation."""
    host_path = host("1x4090")
    gpu = uuids_of(host_path)[0]
    job = spawn(fake_gpu_job, "--mem", "10G", "--seconds", "60", host=host_path, program=True,
                env={"CUDA_VISIBLE_DEVICES": "0"})
    wait_until(lambda: "holding" in read_text(job.out_path), what="fake job holding 10G")
    expires = 60 if liveness == "hold expiry" else None

    def reserved_with(ticks):
        record = lease_record(gpu, 10 * GiB, job.pid, ticks=ticks, expires_in=expires)
        path = write_lease(state_dir, record)
        lock = open(path)
        if liveness == "held lock":
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            memory = status(gpuslot, host_path)["gpus"][0]["memory"]
            return memory["reserved"], memory["available"], memory["free"]
        finally:
            lock.close()
            path.unlink()

    reserved, available, free = reserved_with(start_ticks(job.pid) + 1)  # another process had that pid
    assert reserved == 10 * GiB and available == free - 10 * GiB
    # The same lease with the true start time: the job is the holder, its 10G are the reservation.
    reserved, available, free = reserved_with(None)
    assert reserved == 0 and available == free


# --- snapshots taken while jobs come and go --------------------------------------------------------
#
# These races last microseconds in real life. strace makes them deterministic: it delays chosen
# system calls of one gpuslot process, and the test acts (a job allocates, a job is reaped) at
# the exact point the trace shows.


def traced(argv, env, trace, inject, trigger, action, timeout=30):
    """Runs argv under strace; calls action() once a trace line contains `trigger`; returns
    (returncode, stdout, trace+stderr text)."""
    if subprocess.run(["strace", "-V"], capture_output=True).returncode != 0:
        pytest.skip("strace is not installed")
    process = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=" + trace, "-e", "inject=" + inject, "--", *argv],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, fired = [], False
    try:
        for line in process.stderr:
            seen.append(line)
            if not fired and trigger in line:
                fired = True
                action()
        out = process.stdout.read()
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = "".join(seen)
    if "PTRACE" in text.upper() and process.returncode != 0 and not fired:
        pytest.skip("ptrace is not permitted here: " + text.strip().splitlines()[0])
    assert fired, "never saw %r in the trace:\n%s" % (trigger, text[-3000:])
    return process.returncode, out, text


def test_a_job_allocating_during_a_snapshot_is_counted_once(gpuslot_path, spawn, fake_gpu_job, fake_env, host,
                                                           gpuslot, tmp_path):
    """A 10 GiB lease whose job allocates between the snapshot's memory read and its process-list
    read: the job shows in the process list (so the lease counts as used, 0 outstanding) but not in
    free memory, so those 10 GiB are counted nowhere and a third job is let onto a full GPU. Seen
    in the herd as a rare `CUDA out of memory` despite leases (test_herd.py). The snapshot must
    read the process lists before memory (a tear then counts memory twice, never zero times), or
    re-read until both agree."""
    host_path = host("1x4090")
    env = fake_env(host_path)
    subprocess.run([str(fake_gpu_job), "--mem", "1M", "--seconds", "0"], env={**env, "CUDA_VISIBLE_DEVICES": "0"},
                   check=True, capture_output=True)  # creates the allocations file the trace waits for
    go = tmp_path / "go"
    holder = spawn("run", "--mem", "10G", "--", "sh", "-c",
                   'while [ ! -e "$GO" ]; do sleep 0.01; done; exec "$JOB" --mem 10G --seconds 60',
                   host=host_path, env={"GO": go, "JOB": fake_gpu_job})
    wait_for_leases(gpuslot, host_path, 1)
    allocations = str(host_path) + ".allocations"

    def job_allocates_now():
        go.touch()
        wait_until(lambda: "holding" in read_text(holder.out_path), timeout=5, interval=0.005, what="job allocated")

    rc, out, trace = traced([str(gpuslot_path), "status", "--json"], env, "openat,newfstatat",
                            "newfstatat:delay_exit=80000", 'openat(AT_FDCWD, "%s"' % allocations, job_allocates_now)
    assert rc == 0, trace[-2000:]
    gpu = json.loads(out)["gpus"][0]
    base_used = 235 << 20
    counted = gpu["memory"]["used"] - base_used + gpu["memory"]["reserved"]
    assert counted >= 10 * GiB, (
        "the lease's 10 GiB were counted %.2f GiB (used %d, reserved %d, available %d of %d): a job that "
        "allocated between the memory read and the process-list read vanished from the ledger"
        % (counted / GiB, gpu["memory"]["used"], gpu["memory"]["reserved"], gpu["memory"]["available"],
           gpu["memory"]["total"]))


def test_a_gpu_process_exiting_during_a_snapshot_is_not_fatal(gpuslot_path, fake_gpu_job, fake_env, host):
    """gpuslot reads /proc/<pid>/cmdline of every GPU process; a process reaped between the open and
    the read makes read() fail with ESRCH. That is an ordinary event on a busy host (a job ends),
    so status, pick and run must carry on (the process is simply gone), not die with
    `internal error: basic_filebuf::underflow error reading the file: No such process`."""
    host_path = host("1x4090")
    env = fake_env(host_path)
    job = subprocess.Popen([str(fake_gpu_job), "--mem", "1G", "--seconds", "60"], env={**env, "CUDA_VISIBLE_DEVICES": "0"},
                           stdout=subprocess.PIPE, text=True)
    try:
        assert "holding" in job.stdout.readline()

        def job_ends_now():
            job.kill()
            job.wait()

        rc, out, trace = traced([str(gpuslot_path), "status", "--json"], env, "openat,read",
                                "read:delay_enter=100000", '"/proc/%d/cmdline"' % job.pid, job_ends_now)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert rc == 0, "status failed when a GPU process exited mid-snapshot: " + \
        [line for line in trace.splitlines() if line.startswith("gpuslot")][-1:].__repr__()
    assert json.loads(out)["gpus"][0]["memory"]["total"] > 0


# --- files that must not be trusted -------------------------------------------------------------


def test_corrupt_and_unsafe_lease_files_are_ignored_with_a_warning(gpuslot, host, state_dir, tmp_path):
    host_path = host("1x4090")
    gpu = uuids_of(host_path)[0]

    def live(**kw):  # a record that would reserve all but 3 GiB if it were believed
        return lease_record(gpu, 20 * GiB, os.getpid(), expires_in=120, **kw)

    bad = {}
    bad["garbage"] = write_lease(state_dir, {"id": "garbage"}, text="\x00\xffnot json at all{{{")
    bad["empty"] = write_lease(state_dir, {"id": "empty"}, text="")
    text = json.dumps(live())
    bad["truncated"] = write_lease(state_dir, {"id": "truncated"}, text=text[: len(text) // 2])
    bad["no-gpus"] = write_lease(state_dir, {**live(), "gpu_uuids": [], "id": "no-gpus"})
    bad["wrong-format"] = write_lease(state_dir, {**live(), "format": 99, "id": "wrong-format"})
    bad["world-writable"] = write_lease(state_dir, live(), mode=0o666)
    bad["group-writable"] = write_lease(state_dir, live(), mode=0o664)
    # Claims another uid than the file's owner: someone forging a lease in another user's name.
    bad["wrong-uid"] = write_lease(state_dir, live(uid=os.geteuid() + 4242))
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(live()))
    bad["symlink"] = state_dir / "lease-symlink.json"
    bad["symlink"].symlink_to(target)
    bad["directory"] = state_dir / "lease-directory.json"
    bad["directory"].mkdir()
    bad["fifo"] = state_dir / "lease-fifo.json"
    os.mkfifo(bad["fifo"])

    listed = gpuslot("leases", "--json", host=host_path, check=0, timeout=10)
    assert json.loads(listed.stdout)["leases"] == []
    warnings = warning_lines(listed.stderr)
    for name, path in bad.items():
        assert any(path.name in line for line in warnings), "no warning for %s: %s" % (name, listed.stderr)
    # Never fatal, never trusted: the whole GPU is still there for anyone.
    memory = status(gpuslot, host_path)["gpus"][0]["memory"]
    assert memory["reserved"] == 0 and memory["available"] == memory["free"]
    assert gpuslot("pick", "--mem", "20G", host=host_path, check=0).stdout.strip() == "0"
    marker = tmp_path / "ran"
    ran = gpuslot("run", "--mem", "20G", "--", "touch", marker, host=host_path, check=0)
    assert marker.exists() and warning_lines(ran.stderr)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to chown a lease file to another user")
def test_lease_file_owned_by_another_user_than_it_claims_is_ignored(gpuslot, host, state_dir):
    host_path = host("1x4090")
    path = write_lease(state_dir, lease_record(uuids_of(host_path)[0], 20 * GiB, os.getpid(), uid=0, expires_in=120))
    os.chown(path, 65534, 65534)  # nobody forged a lease "of root"
    listed = gpuslot("leases", "--json", host=host_path, check=0)
    assert json.loads(listed.stdout)["leases"] == []
    assert any(path.name in line and "uid" in line for line in warning_lines(listed.stderr)), listed.stderr
    assert gpuslot("pick", "--mem", "20G", host=host_path).returncode == 0


# --- pick --hold --------------------------------------------------------------------------------


def test_pick_hold_without_mem_reserves_the_default(gpuslot, host):
    host_path = host("4x24g")
    gpuslot("pick", "--hold", "30s", host=host_path, env={"GPUSLOT_DEFAULT_MEM": "3G"})
    (lease,) = leases(gpuslot, host_path)
    assert lease["reserved"] == 3 * GiB


def test_in_use_is_null_in_leases_json_without_nvml(gpuslot, host):
    host_path = host("4x24g")
    gpuslot("pick", "--mem", "1G", "--hold", "30s", host=host_path)
    (lease,) = json.loads(gpuslot("leases", "--json", host=None).stdout)["leases"]  # no driver: no in-use figure
    assert lease["in_use"] is None and lease["reserved"] == GiB
    (lease,) = leases(gpuslot, host_path)
    assert lease["in_use"] == 0


def test_pick_hold_lease_outlives_pick_and_expires(gpuslot, host):
    host_path = host("1x4090")
    began = time.time()
    picked = gpuslot("pick", "--mem", "10G", "--hold", "2s", host=host_path, check=0)
    assert picked.stdout.strip() == "0" and "holding lease" in picked.stderr
    (lease,) = leases(gpuslot, host_path)  # pick has exited; its lease has not
    assert lease["reserved"] == 10 * GiB and lease["gpus"] == [0]
    assert lease["pid"] == os.getpid()  # the launch that follows is the caller's: its tree's memory counts
    assert lease["expires_at_ms"] is not None and 1500 <= lease["expires_at_ms"] - began * 1000 <= 2500
    assert gpuslot("pick", "--mem", "20G", host=host_path).returncode == 1  # held room is not offered again
    assert status(gpuslot, host_path)["gpus"][0]["memory"]["reserved"] == 10 * GiB
    nothing = gpuslot("pick", "--mem", "20G", "--hold", "5s", host=host_path)
    assert nothing.returncode == 1 and nothing.stdout == "" and len(leases(gpuslot, host_path)) == 1
    time.sleep(max(0.0, lease["expires_at_ms"] / 1000 - time.time()) + 0.2)
    assert leases(gpuslot, host_path) == []
    assert gpuslot("pick", "--mem", "20G", host=host_path).returncode == 0


def test_pick_hold_lease_ends_once_the_memory_shows(gpuslot, gpuslot_path, spawn, fake_gpu_job, host):
    host_path = host("1x4090")
    script = 'CUDA_VISIBLE_DEVICES=$("$GS" pick --mem 10G --hold 60s) exec "$JOB" --mem 10G --seconds 60'
    job = spawn("sh", "-c", script, host=host_path, program=True, env={"GS": gpuslot_path, "JOB": fake_gpu_job})
    wait_until(lambda: "holding" in read_text(job.out_path), what="job holding its memory")
    memory = status(gpuslot, host_path)["gpus"][0]["memory"]
    assert memory["reserved"] == 0 and memory["available"] == memory["free"]  # not counted twice
    gpuslot("run", "--mem", "1M", "--", "true", host=host_path, check=0)  # any decision retires it
    assert [lease for lease in leases(gpuslot, host_path) if "hold" in lease["command"]] == []


def test_pick_hold_lease_ends_once_the_memory_shows_from_a_bash_subshell(gpuslot, gpuslot_path, spawn, fake_gpu_job,
                                                                        host):
    """The documented use, `CUDA_VISIBLE_DEVICES=$(gpuslot pick --hold 60s 2>/dev/null) job`, in
    bash: with a redirection bash forks a subshell for the command substitution, so pick's parent
    (the recorded holder) is that subshell, which exits at once. The job's memory must still be
    recognised as the held memory (the launching shell's tree), or it is counted twice for the
    whole hold: here 10 GiB used by the job plus 10 GiB still "reserved"."""
    if not os.path.exists("/bin/bash"):
        pytest.skip("bash is not installed")
    host_path = host("1x4090")
    script = 'CUDA_VISIBLE_DEVICES=$("$GS" pick --mem 10G --hold 60s 2>/dev/null) "$JOB" --mem 10G --seconds 60; true'
    job = spawn("/bin/bash", "-c", script, host=host_path, program=True, env={"GS": gpuslot_path, "JOB": fake_gpu_job})
    wait_until(lambda: "holding" in read_text(job.out_path), what="job holding its memory")
    (lease,) = leases(gpuslot, host_path)
    memory = status(gpuslot, host_path)["gpus"][0]["memory"]
    assert (memory["reserved"], lease["in_use"]) == (0, 10 * GiB), (
        "the held 10 GiB are counted on top of the job's own 10 GiB (holder pid %d is the bash subshell, "
        "job's shell is pid %d)" % (lease["pid"], job.pid))


def test_pick_hold_credits_a_job_once_while_its_memory_loads(gpuslot, gpuslot_path, spawn, fake_gpu_job, host):
    """The shell that ran `pick --hold` is alive and the job's parent: the job is both in the
    holder's tree and in its session. Its memory must be credited to the hold once: with 4 of the
    8 held GiB loaded, 4 GiB are still reserved, and the hold is not over."""
    host_path = host("1x4090")
    script = 'CUDA_VISIBLE_DEVICES=$("$GS" pick --mem 8G --hold 60s) "$JOB" --mem 4G --seconds 60; true'
    job = spawn("sh", "-c", script, host=host_path, program=True, env={"GS": gpuslot_path, "JOB": fake_gpu_job})
    wait_until(lambda: "holding" in read_text(job.out_path), what="job holding half of its memory")
    (lease,) = leases(gpuslot, host_path)
    gpu = status(gpuslot, host_path)["gpus"][0]
    assert (lease["in_use"], gpu["memory"]["reserved"]) == (4 * GiB, 4 * GiB), (lease, gpu["memory"])
    assert gpu["memory"]["available"] == gpu["memory"]["free"] - 4 * GiB
    gpuslot("run", "--mem", "1M", "--", "true", host=host_path, check=0)  # a decision does not retire it
    assert [entry["id"] for entry in leases(gpuslot, host_path)] == [lease["id"]]
    too_big = (gpu["memory"]["available"] + GiB) // MiB
    assert gpuslot("pick", "--mem", str(too_big), host=host_path, check=None).returncode == 1


# --- status --json ------------------------------------------------------------------------------


def test_status_json_lists_leases_and_charges_reservations(gpuslot, spawn, host):
    host_path = host("4x24g")
    spawn("run", "--mem", "10G", "--", "sleep", "30", host=host_path)
    (lease,) = wait_for_leases(gpuslot, host_path, 1)
    gpus = status(gpuslot, host_path)["gpus"]
    (index,) = lease["gpus"]
    assert [entry["id"] for entry in gpus[index]["leases"]] == [lease["id"]]
    assert gpus[index]["leases"][0]["reserved"] == 10 * GiB
    assert gpus[index]["memory"]["reserved"] == 10 * GiB
    assert gpus[index]["memory"]["available"] == gpus[index]["memory"]["free"] - 10 * GiB
    for other in gpus:
        if other["index"] != index:
            assert other["leases"] == [] and other["memory"]["reserved"] == 0
            assert other["memory"]["available"] == other["memory"]["free"]


@pytest.mark.parametrize("job_mem, outstanding", [("10G", 0), ("4G", 6 * GiB)])
@pytest.mark.parametrize("launch", ["direct", "grandchild"])
def test_no_double_counting_once_the_job_memory_shows(gpuslot, spawn, fake_gpu_job, host, job_mem, outstanding, launch):
    host_path = host("4x24g")
    job = [str(fake_gpu_job), "--mem", job_mem, "--seconds", "30"]
    command = job if launch == "direct" else ["sh", "-c", '"$@"; true', "sh", *job]
    holder = spawn("run", "--mem", "10G", "--", *command, host=host_path)
    wait_until(lambda: "holding" in read_text(holder.out_path), what="job holding its memory")
    (lease,) = leases(gpuslot, host_path)
    (index,) = lease["gpus"]
    assert lease["in_use"] == 10 * GiB - outstanding
    gpu = status(gpuslot, host_path)["gpus"][index]
    assert gpu["memory"]["used"] == 10 * GiB - outstanding
    assert gpu["memory"]["reserved"] == outstanding
    assert gpu["memory"]["available"] == gpu["memory"]["free"] - outstanding


def test_release_by_holder_and_unknown_id(gpuslot, spawn, host):
    host_path = host("1x4090")
    spawn("run", "--mem", "20G", "--", "sleep", "30", host=host_path)
    (lease,) = wait_for_leases(gpuslot, host_path, 1)
    released = gpuslot("leases", "--release", lease["id"], host=host_path, check=0)
    assert lease["id"] in released.stdout
    assert leases(gpuslot, host_path) == []
    assert gpuslot("pick", "--mem", "20G", host=host_path).returncode == 0
    unknown = gpuslot("leases", "--release", "12345-deadbeef", host=host_path)
    assert unknown.returncode == 2 and "no lease" in unknown.stderr
    assert gpuslot("leases", "--release", "../../etc/passwd", host=host_path).returncode == 2


# --- an unusable state directory ----------------------------------------------------------------


def assert_refused_without_launch(result, marker, *fragments):
    assert result.returncode == 4, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, "expected one line, got: %r" % result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not marker.exists(), "the command ran"


def make_state_dir(path, mode=0o1777):
    path.mkdir()
    os.chmod(path, mode)


@pytest.fixture
def mounts():
    mounted = []

    def mount(*args):
        result = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip("mount %s failed: %s" % (" ".join(map(str, args)), result.stderr.strip()))
        mounted.append(str(args[-1]))

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", target], capture_output=True)


def test_read_only_state_directory_refuses_to_launch(gpuslot, host, state_dir, tmp_path, mounts):
    host_path = host("4x24g")
    make_state_dir(state_dir)
    if IS_ROOT:  # root ignores mode bits: make the file system itself read-only
        mounts("--bind", state_dir, state_dir)
        mounts("-o", "remount,ro,bind", state_dir)
    else:
        os.chmod(state_dir, 0o555)
    marker = tmp_path / "ran"
    result = gpuslot("run", "--mem", "1G", "--", "touch", marker, host=host_path)
    assert_refused_without_launch(result, marker, str(state_dir), "not writable")
    waited = gpuslot("run", "--mem", "1G", "--wait", "5s", "--", "touch", marker, host=host_path)
    assert_refused_without_launch(waited, marker, str(state_dir))


def test_state_directory_that_cannot_be_created_refuses_to_launch(gpuslot, host, tmp_path, mounts):
    host_path = host("4x24g")
    parent = tmp_path / "parent"
    parent.mkdir()
    if IS_ROOT:
        mounts("--bind", parent, parent)
        mounts("-o", "remount,ro,bind", parent)
    else:
        os.chmod(parent, 0o555)
    marker = tmp_path / "ran"
    result = gpuslot("run", "--mem", "1G", "--", "touch", marker, host=host_path,
                     env={"GPUSLOT_STATE_DIR": parent / "state"})
    assert_refused_without_launch(result, marker, "cannot create state directory", "GPUSLOT_STATE_DIR")


@pytest.mark.skipif(not IS_ROOT, reason="needs root to mount a tiny tmpfs")
def test_full_state_directory_refuses_to_launch(gpuslot, host, state_dir, tmp_path, mounts):
    host_path = host("4x24g")
    state_dir.mkdir()
    mounts("-t", "tmpfs", "-o", "size=16k,mode=1777", "tmpfs", state_dir)
    filler = os.open(state_dir / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(filler, b"\0" * 1024) > 0:
            pass
    except OSError:
        pass  # ENOSPC: full
    finally:
        os.close(filler)
    marker = tmp_path / "ran"
    result = gpuslot("run", "--mem", "1G", "--", "touch", marker, host=host_path)
    assert_refused_without_launch(result, marker, "No space left on device", "nothing was launched")
    held = gpuslot("pick", "--mem", "1G", "--hold", "10s", host=host_path)
    assert held.returncode == 4 and held.stdout == "", held.stdout + held.stderr  # no GPU printed for an unheld pick
    left = sorted(entry.name for entry in state_dir.iterdir())
    assert [name for name in left if "lease" in name] == [], left  # no half-written lease, no temp file


def test_world_writable_state_directory_without_sticky_bit_is_refused(gpuslot, host, state_dir, tmp_path):
    host_path = host("4x24g")
    make_state_dir(state_dir, 0o777)
    marker = tmp_path / "ran"
    result = gpuslot("run", "--mem", "1G", "--", "touch", marker, host=host_path)
    assert_refused_without_launch(result, marker, "sticky", "chmod 1777")


def test_symlinked_state_directory_is_refused(gpuslot, host, state_dir, tmp_path):
    host_path = host("4x24g")
    real = tmp_path / "real-state"
    make_state_dir(real)
    state_dir.symlink_to(real)
    marker = tmp_path / "ran"
    result = gpuslot("run", "--mem", "1G", "--", "touch", marker, host=host_path)
    assert_refused_without_launch(result, marker, "symlink")
    assert list(real.iterdir()) == []


def test_json_output_with_a_path_that_is_not_utf8(gpuslot, host, tmp_path):
    # A state directory named with bytes that are not UTF-8: --json prints U+FFFD, not an error.
    state = tmp_path / "state-\udcff"
    listed = gpuslot("leases", "--json", host=host("4x24g"), env={"GPUSLOT_STATE_DIR": state}, check=0)
    assert json.loads(listed.stdout)["state_dir"].endswith("state-\ufffd")
    assert json.loads(listed.stdout)["leases"] == []
