"""`gpuslot run`: the child's GPU environment, its exit status, signals, waiting (FIFO, prompt
wake-up, time-out), the default reservation, and the over-reservation warning / --enforce.

Every test drives the built binary through the fake NVML; the "job" is a shell snippet or
fake-gpu-job, so what the child saw is read back from files it wrote. Background launches run in
their own session and are killed (by process group) when the test ends, so a failing test
leaves nothing running.
"""
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import wait_until, read_text, leases, wait_for_leases, wait_waiting

GiB = 1 << 30


# --- helpers ------------------------------------------------------------------------------------


def env_of(path):
    return dict(line.split("=", 1) for line in read_text(path).splitlines() if "=" in line)


def uuids_of(host_path):
    return [gpu["uuid"] for gpu in json.loads(host_path.read_text())["gpus"]]


# --- the child's environment --------------------------------------------------------------------


def test_child_gets_index_env_uuids_and_lease_id(gpuslot, gpuslot_path, host, tmp_path):
    host_path = host("4x24g")
    out = tmp_path / "env.txt"
    seen_leases = tmp_path / "leases.json"
    gpuslot("run", "--mem", "1G", "--", "sh", "-c", 'env > "$OUT"; "$GS" leases --json > "$SEEN"',
            host=host_path, env={"OUT": out, "GS": gpuslot_path, "SEEN": seen_leases}, check=0)
    child = env_of(out)
    index = int(child["CUDA_VISIBLE_DEVICES"])
    assert 0 <= index < 4
    assert child["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert child["GPUSLOT_GPU_UUIDS"] == uuids_of(host_path)[index]
    # The id names the lease that was live while the child ran, on the GPU the child was given.
    during = json.loads(seen_leases.read_text())["leases"]
    assert [lease["id"] for lease in during] == [child["GPUSLOT_LEASE_ID"]]
    assert during[0]["gpus"] == [index] and during[0]["reserved"] == 1 * GiB
    assert leases(gpuslot, host_path) == []  # released once the child is reaped


def test_a_command_line_that_is_not_utf8_runs_as_given(gpuslot, gpuslot_path, host, tmp_path):
    # argv is bytes; the lease (JSON) shows U+FFFD, the child gets the bytes unchanged.
    host_path = host("4x24g")
    out = tmp_path / "arg.bin"
    seen_leases = tmp_path / "leases.json"
    gpuslot("run", "--mem", "1G", "--", "sh", "-c", 'printf %s "$1" > "$OUT"; "$GS" leases --json > "$SEEN"',
            "sh", "a\udcffb", host=host_path, env={"OUT": out, "GS": gpuslot_path, "SEEN": seen_leases}, check=0)
    assert out.read_bytes() == b"a\xffb"
    during = json.loads(seen_leases.read_text(encoding="utf-8"))["leases"]
    assert len(during) == 1 and during[0]["command"].endswith("sh a\ufffdb")


def test_export_uuid_and_several_gpus(gpuslot, host, tmp_path):
    host_path = host("4x24g")
    out = tmp_path / "env.txt"
    gpuslot("run", "--mem", "1G", "--gpus", "2", "--export", "uuid", "--", "sh", "-c", 'env > "$OUT"',
            host=host_path, env={"OUT": out}, check=0)
    child = env_of(out)
    chosen = child["CUDA_VISIBLE_DEVICES"].split(",")
    assert len(chosen) == 2 and len(set(chosen)) == 2
    assert set(chosen) <= set(uuids_of(host_path))
    assert child["GPUSLOT_GPU_UUIDS"].split(",") == chosen


def test_inherited_cuda_visible_devices_limits_candidates(gpuslot, spawn, host, tmp_path):
    """GPUs 2 and 3 only: two 20G holders take both; a third request fails although 0 and 1 are
    empty — the child never gets a GPU outside its parent's CUDA_VISIBLE_DEVICES."""
    host_path = host("4x24g")
    restricted = {"CUDA_VISIBLE_DEVICES": "2,3"}
    holders = []
    for name in ("first", "second"):
        holders.append(spawn("run", "--mem", "20G", "--", "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES" > "$OUT"; sleep 30',
                             host=host_path, env={**restricted, "OUT": tmp_path / name}))
        wait_until(lambda: read_text(tmp_path / name).strip(), what="holder %s started" % name)
    assert sorted(read_text(tmp_path / n).strip() for n in ("first", "second")) == ["2", "3"]
    third = gpuslot("run", "--mem", "20G", "--", "touch", tmp_path / "third", host=host_path, env=restricted)
    assert third.returncode == 1, third.stderr
    assert not (tmp_path / "third").exists()
    # Without the restriction the same request fits on GPU 0.
    gpuslot("run", "--mem", "20G", "--", "touch", tmp_path / "free", host=host_path, check=0)
    assert (tmp_path / "free").exists()


def test_inherited_uuid_visibility_is_respected(gpuslot, host, tmp_path):
    host_path = host("4x24g")
    uuids = uuids_of(host_path)
    out = tmp_path / "env.txt"
    gpuslot("run", "--mem", "1G", "--", "sh", "-c", 'env > "$OUT"', host=host_path,
            env={"CUDA_VISIBLE_DEVICES": uuids[3][:12], "OUT": out}, check=0)
    child = env_of(out)
    assert child["CUDA_VISIBLE_DEVICES"] == "3" and child["GPUSLOT_GPU_UUIDS"] == uuids[3]
    hidden = gpuslot("run", "--mem", "1G", "--", "touch", tmp_path / "never", host=host_path,
                     env={"CUDA_VISIBLE_DEVICES": "-1"})
    assert hidden.returncode == 1 and not (tmp_path / "never").exists()


# --- exit status and signals --------------------------------------------------------------------


def test_exit_status_is_the_childs(gpuslot, host):
    host_path = host("4x24g")
    assert gpuslot("run", "--mem", "1G", "--", "sh", "-c", "exit 7", host=host_path).returncode == 7
    assert gpuslot("run", "--mem", "1G", "--", "true", host=host_path).returncode == 0
    assert gpuslot("run", "--mem", "1G", "--", "/nonexistent/cmd", host=host_path).returncode == 127


def test_child_killed_by_signal_gives_128_plus_signal(gpuslot, host):
    host_path = host("4x24g")
    assert gpuslot("run", "--mem", "1G", "--", "sh", "-c", "kill -KILL $$", host=host_path).returncode == 128 + 9
    assert gpuslot("run", "--mem", "1G", "--", "sh", "-c", "kill -TERM $$", host=host_path).returncode == 128 + 15


def test_sigterm_to_run_is_forwarded_to_the_child(spawn, host, tmp_path):
    host_path = host("4x24g")
    ready, marker = tmp_path / "ready", tmp_path / "marker"
    script = "trap 'echo got-term > \"$MARK\"; exit 3' TERM; touch \"$READY\"; while :; do sleep 0.05; done"
    run = spawn("run", "--mem", "1G", "--", "sh", "-c", script, host=host_path, env={"READY": ready, "MARK": marker})
    wait_until(ready.exists, what="child ready")
    os.kill(run.pid, signal.SIGTERM)
    assert run.wait(timeout=10) == 3
    assert read_text(marker).strip() == "got-term"


def test_sigterm_stops_a_gpu_job_which_returns_143(spawn, gpuslot, fake_gpu_job, host):
    host_path = host("4x24g")
    run = spawn("run", "--mem", "2G", "--", fake_gpu_job, "--mem", "2G", "--seconds", "30", host=host_path)
    wait_until(lambda: "holding" in read_text(run.out_path), what="job holding memory")
    os.kill(run.pid, signal.SIGTERM)
    assert run.wait(timeout=10) == 128 + signal.SIGTERM
    assert leases(gpuslot, host_path) == []



def gpu_processes(gpuslot, host_path):
    gpus = json.loads(gpuslot("status", "--json", host=host_path, check=0).stdout)["gpus"]
    return [process for gpu in gpus for process in gpu["processes"]]


def test_sigterm_to_run_reaches_a_job_started_by_a_script(spawn, gpuslot, fake_gpu_job, host):
    """`kill <gpuslot>` (a scheduler's stop) must stop the job, not only the script that started
    it: the script dies at once and would leave its child running on the GPU."""
    host_path = host("4x24g")
    run = spawn("run", "--mem", "2G", "--", "sh", "-c", '"$JOB" --mem 2G --seconds 60; echo after', host=host_path,
                env={"JOB": fake_gpu_job})
    wait_until(lambda: "holding" in read_text(run.out_path), what="job holding memory")
    os.kill(run.pid, signal.SIGTERM)
    assert run.wait(timeout=10) == 128 + signal.SIGTERM
    wait_until(lambda: gpu_processes(gpuslot, host_path) == [], timeout=5, what="the job's process to end")
    assert "after" not in read_text(run.out_path)


def test_enforce_stops_every_process_of_a_job_started_by_a_script(gpuslot, fake_gpu_job, host):
    host_path = host("4x24g")
    result = gpuslot("run", "--mem", "2G", "--enforce", "--", "sh", "-c", '"$JOB" --mem 6G --seconds 30; echo after',
                     host=host_path, env={"JOB": fake_gpu_job}, timeout=20)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "stopping" in result.stderr and "after" not in result.stdout
    wait_until(lambda: gpu_processes(gpuslot, host_path) == [], timeout=5, what="the job's process to end")


def test_enforce_kills_what_ignores_sigterm_after_the_grace(gpuslot, fake_gpu_job, host):
    """The script ignores SIGTERM (and so does the sleep it starts): SIGKILL follows 5 s later."""
    host_path = host("4x24g")
    began = time.monotonic()
    result = gpuslot("run", "--mem", "2G", "--enforce", "--", "sh", "-c",
                     'trap "" TERM; "$JOB" --mem 6G --seconds 30; sleep 60', host=host_path, env={"JOB": fake_gpu_job},
                     timeout=40)
    assert result.returncode == 128 + signal.SIGKILL, result.stderr
    assert "SIGKILL in 5 s" in result.stderr
    assert 5 <= time.monotonic() - began < 30
    assert gpu_processes(gpuslot, host_path) == [] and leases(gpuslot, host_path) == []


def test_a_job_with_no_reservation_is_watched_too(gpuslot, fake_gpu_job, host):
    host_path = host("4x24g")
    result = gpuslot("run", "--mem", "0", "--", fake_gpu_job, "--mem", "1G", "--seconds", "3", host=host_path)
    assert result.returncode == 0 and result.stderr.count("above its 0.00 GiB reservation") == 1, result.stderr


# --- nothing fits, waiting ----------------------------------------------------------------------


def test_nothing_fits_exits_1_at_once_with_the_reason(gpuslot, spawn, host, tmp_path):
    host_path = host("1x4090")
    spawn("run", "--mem", "20G", "--", "sleep", "30", host=host_path)
    wait_for_leases(gpuslot, host_path, 1)
    began = time.monotonic()
    result = gpuslot("run", "--mem", "10G", "--", "touch", tmp_path / "never", host=host_path)
    assert time.monotonic() - began < 2.0
    assert result.returncode == 1, result.stderr
    assert "no GPU fits now" in result.stderr and "--wait" in result.stderr
    assert "3.76 GiB available" in result.stderr  # 23.76 GiB free, 20 GiB of it reserved
    assert not (tmp_path / "never").exists()
    # Larger than any GPU: impossible, no hint to wait.
    impossible = gpuslot("run", "--mem", "30G", "--", "touch", tmp_path / "never", host=host_path)
    assert impossible.returncode == 1 and "largest visible GPU" in impossible.stderr
    assert not (tmp_path / "never").exists()


def test_waiting_cannot_help_an_impossible_request(gpuslot, host, tmp_path):
    began = time.monotonic()
    result = gpuslot("run", "--mem", "30G", "--wait", "--", "touch", tmp_path / "never", host=host("1x4090"))
    assert result.returncode == 1 and time.monotonic() - began < 2.0
    assert "largest visible GPU" in result.stderr and "waiting:" not in result.stderr
    assert not (tmp_path / "never").exists()


def test_malformed_wait_timeout_is_bad_input_not_the_command(gpuslot, host, tmp_path):
    """`--wait 10mins -- CMD`: the word between --wait and `--` can only be the timeout. It must be
    refused as a malformed duration (exit 2, saying what is accepted), not become the command
    (today gpuslot takes a lease and tries to execute "10mins": exit 127)."""
    marker = tmp_path / "ran"
    result = gpuslot("run", "--mem", "1G", "--wait", "10mins", "--", "touch", marker, host=host("4x24g"))
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "10mins" in result.stderr and "duration" in result.stderr, result.stderr
    assert not marker.exists()
    empty = gpuslot("run", "--mem", "1G", "--wait", "", "--", "touch", marker, host=host("4x24g"))
    assert empty.returncode == 2, (empty.returncode, empty.stderr)
    assert "invalid duration ''" in empty.stderr and "like 90" in empty.stderr, empty.stderr
    assert len(empty.stderr.strip().splitlines()) == 1, empty.stderr
    assert not marker.exists()


def test_wait_timeout_exits_124_with_pending_reason_announced_once(gpuslot, spawn, host, tmp_path):
    host_path = host("1x4090")
    spawn("run", "--mem", "20G", "--", "sleep", "30", host=host_path)
    wait_for_leases(gpuslot, host_path, 1)
    began = time.monotonic()
    result = gpuslot("run", "--mem", "10G", "--wait", "1.5s", "--", "touch", tmp_path / "never", host=host_path)
    elapsed = time.monotonic() - began
    assert result.returncode == 124, result.stderr
    assert 1.4 <= elapsed < 4.0
    assert result.stderr.count("waiting:") == 1, result.stderr
    waiting_line = next(line for line in result.stderr.splitlines() if "waiting:" in line)
    assert "10 GiB requested" in waiting_line or "10.00 GiB" in waiting_line, waiting_line
    assert "timed out waiting" in result.stderr and "no GPU fits now" in result.stderr.split("timed out")[1]
    assert not (tmp_path / "never").exists()


def test_waiters_are_served_first_come_first_served(gpuslot, spawn, host, tmp_path):
    host_path = host("1x4090")
    go, order = tmp_path / "go", tmp_path / "order"
    spawn("run", "--mem", "20G", "--", "sh", "-c", 'while [ ! -e "$GO" ]; do sleep 0.02; done', host=host_path,
          env={"GO": go})
    wait_for_leases(gpuslot, host_path, 1)
    waiters = []
    for name in ("A", "B", "C"):
        waiter = spawn("run", "--mem", "20G", "--wait", "--", "sh", "-c", 'echo %s >> "$ORDER"; sleep 0.2' % name,
                       host=host_path, env={"ORDER": order})
        wait_waiting(waiter)  # queued before the next one arrives
        waiters.append(waiter)
    go.touch()
    assert [waiter.wait(timeout=20) for waiter in waiters] == [0, 0, 0]
    assert read_text(order).split() == ["A", "B", "C"]


def queue_big_then_small(spawn, gpuslot_path, host_path, order, small_env=None):
    """Queues a 10G waiter, then a 1G one (with `small_env`). Each appends its name to `order` when
    it runs. Once the room frees both fit, so the order their commands print in is a race; what
    must hold is that the small one starts only after the big one's lease exists, so the small
    one's command records itself only if that lease is listed."""
    big = spawn("run", "--mem", "10G", "--wait", "--", "sh", "-c", 'echo big >> "$ORDER"; sleep 1', host=host_path,
                env={"ORDER": order})
    wait_waiting(big)
    small = spawn("run", "--mem", "1G", "--wait", "--", "sh", "-c",
                  '"$GPUSLOT" leases --json | grep -q \'"reserved": 10737418240\' && echo small >> "$ORDER"',
                  host=host_path, env={"ORDER": order, "GPUSLOT": str(gpuslot_path), **(small_env or {})})
    wait_waiting(small)
    return big, small


def test_a_small_request_does_not_overtake_an_earlier_waiter(gpuslot, gpuslot_path, spawn, host, tmp_path):
    """3.76 GiB are free beside a 20G holder: a 1G waiter would fit now, but a 10G waiter came
    first, so the 1G one waits behind it (a big request is never starved by small ones)."""
    host_path = host("1x4090")
    go, order = tmp_path / "go", tmp_path / "order"
    spawn("run", "--mem", "20G", "--", "sh", "-c", 'while [ ! -e "$GO" ]; do sleep 0.02; done', host=host_path,
          env={"GO": go})
    wait_for_leases(gpuslot, host_path, 1)
    big, small = queue_big_then_small(spawn, gpuslot_path, host_path, order)
    time.sleep(0.5)
    assert read_text(order) == ""
    go.touch()
    assert (big.wait(timeout=10), small.wait(timeout=10)) == (0, 0)
    assert sorted(read_text(order).split()) == ["big", "small"], "the 1G launch started before the 10G one's lease"


def test_a_waiter_is_not_held_up_by_one_that_cannot_use_its_gpus(gpuslot, spawn, host, tmp_path):
    """GPU 0 is full and a launch limited to GPU 0 waits for it. A later launch limited to GPU 2,
    which is idle, starts at once: the earlier one could never use GPU 2."""
    host_path = host("4x24g")
    spawn("run", "--mem", "20G", "--device", "cuda:0", "--", "sleep", "60", host=host_path)
    wait_for_leases(gpuslot, host_path, 1)
    first = spawn("run", "--mem", "10G", "--wait", "--", "touch", tmp_path / "first", host=host_path,
                  env={"CUDA_VISIBLE_DEVICES": "0"})
    wait_waiting(first)
    began = time.monotonic()
    later = gpuslot("run", "--mem", "1G", "--wait", "30s", "--", "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"',
                    host=host_path, env={"CUDA_VISIBLE_DEVICES": "2"}, timeout=40)
    assert later.returncode == 0 and later.stdout.strip() == "2", later.stderr
    assert time.monotonic() - began < 5 and "waiting:" not in later.stderr, later.stderr
    assert first.poll() is None and not (tmp_path / "first").exists()


def test_a_waiter_does_not_take_a_gpu_an_earlier_waiter_could_use(gpuslot, gpuslot_path, spawn, host, tmp_path):
    """Every GPU has 4 GiB left. An earlier launch waits for 10 GiB on any GPU; a later one limited
    to GPU 2 would fit there now, but GPU 2 is one the earlier launch could get: it waits."""
    host_path = host("4x24g")
    go, order = tmp_path / "go", tmp_path / "order"
    spawn("run", "--mem", "20G", "--gpus", "4", "--", "sh", "-c", 'while [ ! -e "$GO" ]; do sleep 0.02; done',
          host=host_path, env={"GO": go})
    wait_for_leases(gpuslot, host_path, 1)
    big, small = queue_big_then_small(spawn, gpuslot_path, host_path, order, small_env={"CUDA_VISIBLE_DEVICES": "2"})
    assert "1 launch ahead" in small.stderr_text()
    time.sleep(1)
    assert not order.exists(), read_text(order)
    go.touch()
    assert big.wait(timeout=20) == 0 and small.wait(timeout=20) == 0
    assert sorted(read_text(order).split()) == ["big", "small"], "the GPU 2 launch started before the 10G one's lease"


def test_a_killed_waiter_leaves_the_queue(gpuslot, spawn, host, tmp_path):
    host_path = host("1x4090")
    go, started = tmp_path / "go", tmp_path / "started"
    spawn("run", "--mem", "20G", "--", "sh", "-c", 'while [ ! -e "$GO" ]; do sleep 0.02; done', host=host_path,
          env={"GO": go})
    wait_for_leases(gpuslot, host_path, 1)
    doomed = spawn("run", "--mem", "20G", "--wait", "--", "true", host=host_path)
    wait_waiting(doomed)
    after = spawn("run", "--mem", "20G", "--wait", "--", "sh", "-c", 'date +%s.%N > "$STARTED"', host=host_path,
                  env={"STARTED": started})
    wait_waiting(after)
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait()
    released_at = time.time()
    go.touch()
    assert after.wait(timeout=10) == 0
    assert float(read_text(started)) - released_at < 1.0


def test_a_stopped_waiter_does_not_block_the_queue(gpuslot, spawn, host, tmp_path):
    """A waiter suspended with Ctrl-Z or SIGSTOP keeps its ticket locked but cannot take its turn.
    Like a dead waiter it must not hold up everyone queued behind it (today the whole host's
    queue stalls until it is resumed). Suggested rule: a ticket whose process is stopped (state
    T/t in /proc/<pid>/stat; the pid is in the ticket's name) does not count as ahead."""
    host_path = host("1x4090")
    go, started = tmp_path / "go", tmp_path / "started"
    spawn("run", "--mem", "20G", "--", "sh", "-c", 'while [ ! -e "$GO" ]; do sleep 0.02; done', host=host_path,
          env={"GO": go})
    wait_for_leases(gpuslot, host_path, 1)
    stopped = spawn("run", "--mem", "20G", "--wait", "--", "true", host=host_path)
    wait_waiting(stopped)
    after = spawn("run", "--mem", "20G", "--wait", "--", "sh", "-c", 'date +%s.%N > "$STARTED"', host=host_path,
                  env={"STARTED": started})
    wait_waiting(after)
    os.kill(stopped.pid, signal.SIGSTOP)
    try:
        released_at = time.time()
        go.touch()
        try:
            after.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pytest.fail("the launch queued behind a stopped waiter did not start within 3 s of the room freeing")
        assert float(read_text(started)) - released_at < 1.0
    finally:
        os.kill(stopped.pid, signal.SIGCONT)


def test_waiter_starts_promptly_when_the_holder_ends(gpuslot, spawn, host, tmp_path):
    host_path = host("1x4090")
    go, ended, started = tmp_path / "go", tmp_path / "ended", tmp_path / "started"
    spawn("run", "--mem", "20G", "--", "sh", "-c",
          'while [ ! -e "$GO" ]; do sleep 0.02; done; date +%s.%N > "$ENDED"', host=host_path,
          env={"GO": go, "ENDED": ended})
    wait_for_leases(gpuslot, host_path, 1)
    waiter = spawn("run", "--mem", "20G", "--wait", "--", "sh", "-c", 'date +%s.%N > "$STARTED"', host=host_path,
                   env={"STARTED": started})
    wait_waiting(waiter)
    time.sleep(0.3)
    go.touch()
    assert waiter.wait(timeout=10) == 0
    delay = float(read_text(started)) - float(read_text(ended))
    assert 0 <= delay < 1.0, "waiter started %.3f s after the holder ended" % delay


def test_waiter_starts_promptly_when_a_lease_is_released_by_hand(gpuslot, spawn, host, tmp_path):
    host_path = host("1x4090")
    started = tmp_path / "started"
    spawn("run", "--mem", "20G", "--", "sleep", "30", host=host_path)
    (held,) = wait_for_leases(gpuslot, host_path, 1)
    waiter = spawn("run", "--mem", "20G", "--wait", "--", "sh", "-c", 'date +%s.%N > "$STARTED"', host=host_path,
                   env={"STARTED": started})
    wait_waiting(waiter)
    time.sleep(0.3)
    released_at = time.time()
    gpuslot("leases", "--release", held["id"], host=host_path, check=0)
    assert waiter.wait(timeout=10) == 0
    delay = float(read_text(started)) - released_at
    assert delay < 1.0, "waiter started %.3f s after the release" % delay


# --- reservation size ---------------------------------------------------------------------------


@pytest.mark.parametrize("default_mem, expected", [(None, 2 * GiB), ("3G", 3 * GiB), ("512M", GiB // 2)])
def test_default_reservation_when_mem_is_absent(gpuslot, gpuslot_path, host, tmp_path, default_mem, expected):
    host_path = host("4x24g")
    seen = tmp_path / "leases.json"
    env = {"GS": gpuslot_path, "SEEN": seen}
    if default_mem is not None:
        env["GPUSLOT_DEFAULT_MEM"] = default_mem
    gpuslot("run", "--", "sh", "-c", '"$GS" leases --json > "$SEEN"', host=host_path, env=env, check=0)
    (lease,) = json.loads(seen.read_text())["leases"]
    assert lease["reserved"] == expected


def test_using_more_than_reserved_warns_once(gpuslot, fake_gpu_job, host):
    host_path = host("4x24g")
    result = gpuslot("run", "--mem", "2G", "--", fake_gpu_job, "--mem", "6G", "--seconds", "3", host=host_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("above its") == 1, result.stderr
    assert "warning" in result.stderr and "6.00 GiB" in result.stderr and "2.00 GiB" in result.stderr


def test_enforce_stops_a_job_using_more_than_reserved(gpuslot, fake_gpu_job, host):
    host_path = host("4x24g")
    began = time.monotonic()
    result = gpuslot("run", "--mem", "2G", "--enforce", "--", fake_gpu_job, "--mem", "6G", "--seconds", "20",
                     host=host_path)
    assert time.monotonic() - began < 8
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "stopping" in result.stderr and "--enforce" in result.stderr
    assert leases(gpuslot, host_path) == []
