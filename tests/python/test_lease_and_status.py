"""gpuslot.lease (a context manager over the host ledger) and gpuslot.status (the document of
`gpuslot status --json`)."""
import json
import os
import signal
import time

from conftest import wait_until, read_host, write_host, leases


def hold_room(python_spawn, host_path, gpus=1):
    """A process holding a 20 GiB lease on `gpus` GPUs for a minute, once it holds it."""
    holder = python_spawn("""
        import time, gpuslot
        held = gpuslot.lease(mem="20G", gpus=%d)
        print("holding", flush=True)
        time.sleep(120)
    """ % gpus, host_path)
    wait_until(lambda: "holding" in holder.stdout_text(), what="the holder")
    return holder

def test_lease_context_manager_gives_ordinals_uuids_and_indices(python_run, host, gpuslot):
    host_path = host("4x24g")
    uuids = [gpu["uuid"] for gpu in read_host(host_path)["gpus"]]
    out = python_run("""
        import json, subprocess, sys, os
        import gpuslot
        with gpuslot.lease(mem="8G", gpus=2) as held:
            print(json.dumps({"ordinals": held.cuda_ordinals, "uuids": held.uuids, "indices": held.nvml_indices,
                              "devices": held.devices, "bytes": held.reserved_bytes, "held": held.held, "id": held.id}))
            listed = subprocess.run([os.environ["GPUSLOT"], "leases", "--json"], capture_output=True, text=True).stdout
            print(json.dumps(json.loads(listed)["leases"]))
        print(held.held, repr(held))
    """, host=host_path, env={"CUDA_VISIBLE_DEVICES": "3,2,1", "GPUSLOT": gpuslot("--version").args[0]}).stdout.splitlines()
    taken = json.loads(out[0])
    # cuda:0 is GPU 3 here (CUDA_VISIBLE_DEVICES=3,2,1); ties go to the lowest NVML index: GPUs 1, 2.
    assert taken["indices"] == [1, 2]
    assert taken["ordinals"] == [2, 1]
    assert taken["devices"] == ["cuda:2", "cuda:1"]
    assert taken["uuids"] == [uuids[1], uuids[2]]
    assert taken["bytes"] == 8 << 30 and taken["held"] is True
    listed = json.loads(out[1])
    assert [(lease["id"], lease["gpus"], lease["command"].split(":")[0]) for lease in listed] == [(taken["id"], [1, 2], "lease")]
    assert out[2] == "False <gpuslot.Lease released>"
    assert json.loads(gpuslot("leases", "--json", host=host_path, check=0).stdout)["leases"] == []


def test_lease_waits_for_room_and_gets_it_when_released(python_spawn, host, tmp_path):
    host_path = host("1x4090")
    release = tmp_path / "release"
    holder = python_spawn("""
        import os, time, gpuslot
        held = gpuslot.lease(mem="20G")
        print("holding", flush=True)
        while not os.path.exists(os.environ["RELEASE"]):
            time.sleep(0.01)
        held.release()
        print("released", flush=True)
        time.sleep(60)
    """, host_path, env={"RELEASE": release})
    wait_until(lambda: "holding" in holder.stdout_text(), what="the holder")
    waiter = python_spawn("""
        import logging, gpuslot
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        with gpuslot.lease(mem="20G", wait=True, timeout=60) as held:
            print("got", held.cuda_ordinals, flush=True)
    """, host_path)
    wait_until(lambda: "waiting: no GPU fits now" in waiter.stderr_text(), timeout=30, what="the waiter to wait")
    assert waiter.stdout_text() == ""
    release.write_text("")
    wait_until(lambda: "got" in waiter.stdout_text(), timeout=30, what="the waiter's lease")
    assert "released" in holder.stdout_text()
    assert waiter.stdout_text().strip() == "got [0]"


def test_lease_timeout_and_no_wait(python_run, host):
    host_path = host("1x4090")
    out = python_run("""
        import time, gpuslot
        held = gpuslot.lease(mem="20G")
        started = time.monotonic()
        try:
            gpuslot.lease(mem="20G", timeout=0.5)
        except gpuslot.Timeout as error:
            print(type(error).__name__, isinstance(error, TimeoutError), error.exit_code, round(time.monotonic() - started, 1) >= 0.4)
            print(error)
        try:
            gpuslot.lease(mem="20G", wait=False)
        except gpuslot.NoGpuAvailable as error:
            print(type(error).__name__, len(error.reasons))
        try:
            gpuslot.lease(mem="100G")   # waiting cannot help: raised at once, not after a wait
        except gpuslot.NoGpuAvailable as error:
            print(error)
    """, host=host_path).stdout.splitlines()
    assert out[0] == "Timeout True 124 True"
    assert out[1].startswith("timed out waiting for room: ")
    assert out[2] == "NoGpuAvailable 1"
    assert out[3].endswith("(waiting cannot help)")


def test_ctrl_c_interrupts_a_waiting_lease(python_spawn, host, gpuslot):
    host_path = host("1x4090")
    hold_room(python_spawn, host_path)
    waiter = python_spawn("""
        import gpuslot
        print("waiting", flush=True)
        try:
            gpuslot.lease(mem="20G")
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """, host_path)
    wait_until(lambda: "waiting" in waiter.stdout_text(), what="the waiter")
    time.sleep(0.5)
    os.kill(waiter.pid, signal.SIGINT)
    wait_until(lambda: "interrupted" in waiter.stdout_text(), timeout=5, what="KeyboardInterrupt in the waiter")
    assert waiter.wait(timeout=10) == 0


def test_an_interrupted_wait_that_carries_on_leaves_the_queue(python_spawn, python_run, host, state_dir):
    """A notebook: Ctrl-C ends a waiting lease() and the kernel lives on. Its place in the queue
    must go with it, or every later waiter on the host (FIFO) waits behind a ghost."""
    host_path = host("1x4090")
    hold_room(python_spawn, host_path)
    notebook = python_spawn("""
        import time, gpuslot
        print("waiting", flush=True)
        try:
            gpuslot.lease(mem="20G")
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        time.sleep(60)
    """, host_path)
    wait_until(lambda: "waiting" in notebook.stdout_text(), what="the notebook's wait")
    wait_until(lambda: any(name.endswith(".ticket") for name in os.listdir(state_dir)), what="its ticket")
    os.kill(notebook.pid, signal.SIGINT)
    wait_until(lambda: "interrupted" in notebook.stdout_text(), timeout=5, what="KeyboardInterrupt in the notebook")
    assert [name for name in os.listdir(state_dir) if name.endswith(".ticket")] == []
    out = python_run("""
        import gpuslot
        with gpuslot.lease(mem="1G", timeout=10) as held:
            print("got", held.nvml_indices)
    """, host=host_path, timeout=30)
    assert out.stdout.strip() == "got [0]", out.stderr


def test_a_forked_child_does_not_keep_a_dead_parents_lease(python_spawn, host, gpuslot, tmp_path):
    """A process that forks while it holds a lease (a data loader's workers) and then dies: its
    lease must go at once, not when the last child exits."""
    host_path = host("4x24g")
    child_pid = tmp_path / "child"
    parent = python_spawn("""
        import os, sys, time, gpuslot
        held = gpuslot.lease(mem="8G")
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        open(os.environ["CHILD_PID"], "w").write(str(child))
        print("forked", held.id, flush=True)
        time.sleep(60)
    """, host_path, env={"CHILD_PID": child_pid})
    wait_until(lambda: "forked" in parent.stdout_text(), what="the parent to fork")
    lease_id = parent.stdout_text().split()[1]
    assert [lease["id"] for lease in leases(gpuslot, host_path)] == [lease_id]
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    child = int(child_pid.read_text())
    try:
        assert os.path.exists("/proc/%d" % child), "the child should still be alive"
        assert leases(gpuslot, host_path) == []
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_daemon_thread_waiting_for_a_lease_lets_the_interpreter_exit(python_spawn, python_run, host):
    """A daemon thread still waiting in lease() when the program ends. Python ends such a thread
    when it takes the GIL during shutdown, which from inside gpuslot aborted or crashed the
    process now and then (1 run in 6 to 40 here). Shutdown is held open by a slow __del__ so
    that the waiting thread polls while it lasts; the process must exit cleanly, every time."""
    host_path = host("4x24g")
    hold_room(python_spawn, host_path, gpus=4)
    for _ in range(5):
        out = python_run("""
            import threading, time, gpuslot
            class SlowAtShutdown:
                def __del__(self):
                    time.sleep(0.5)
            keeper = SlowAtShutdown()
            threading.Thread(target=lambda: gpuslot.lease(mem="10G"), daemon=True).start()
            time.sleep(0.3)
            print("main exits", flush=True)
        """, host=host_path, check=None, timeout=30)
        assert (out.returncode, out.stdout) == (0, "main exits\n"), out.stderr


def test_ctrl_c_while_the_pending_reason_is_logged_still_interrupts(python_spawn, python_run, host):
    host_path = host("1x4090")
    hold_room(python_spawn, host_path)
    out = python_run("""
        import logging, os, signal, threading, time, gpuslot

        class SlowHandler(logging.Handler):  # a handler that ships records somewhere slow
            def emit(self, record):
                time.sleep(2)

        logging.getLogger("gpuslot").addHandler(SlowHandler())
        logging.getLogger("gpuslot").setLevel(logging.INFO)
        threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()  # during the "waiting:" record
        began = time.monotonic()
        try:
            gpuslot.lease(mem="20G", timeout=20)
        except KeyboardInterrupt:
            print("interrupted after %.0f s" % (time.monotonic() - began))
    """, host=host_path, timeout=60)
    words = out.stdout.split()
    assert words[:2] == ["interrupted", "after"] and int(words[2]) < 10, out


def test_lease_restricted_to_a_device(python_run, host):
    out = python_run("""
        import gpuslot
        with gpuslot.lease(mem="1G", device="cuda:1") as held:
            print(held.cuda_ordinals, held.nvml_indices)
        try:
            gpuslot.lease(mem="1G", device="cuda:7")
        except gpuslot.BadInput as error:
            print(error)
    """, host="4x24g", env={"CUDA_VISIBLE_DEVICES": "2,3"}).stdout.splitlines()
    assert out == ["[1] [3]", "device cuda:7 does not exist: 2 GPUs are visible (cuda:0 to cuda:1)"]


def _without_ages(document):
    for gpu in document["gpus"]:
        for lease in gpu["leases"]:
            lease.pop("age_seconds")
    return document


def test_status_is_the_status_json_document(python_spawn, python_run, host, gpuslot):
    host_path = host("8x4090")
    holder = python_spawn("""
        import time, gpuslot
        gpuslot.select_best_gpu(6)
        print("holding", flush=True)
        time.sleep(60)
    """, host_path)
    wait_until(lambda: "holding" in holder.stdout_text(), what="the holder")
    for extra in ({}, {"CUDA_VISIBLE_DEVICES": "5,2"}):
        command = json.loads(gpuslot("status", "--json", host=host_path, env=extra, check=0).stdout)
        function = json.loads(python_run("import gpuslot, json; print(json.dumps(gpuslot.status()))",
                                         host=host_path, env=extra).stdout)
        assert _without_ages(function) == _without_ages(command)
        assert sum(len(gpu["leases"]) for gpu in function["gpus"]) == 1


def test_status_without_a_driver_raises_nvml_unavailable(python_run):
    out = python_run("""
        import gpuslot
        try:
            gpuslot.status()
        except gpuslot.NvmlUnavailable as error:
            print(error.exit_code)
    """).stdout.strip()
    assert out == "3"


def test_a_file_name_that_is_not_utf8_in_the_state_directory_fails_no_call(python_run, host, state_dir):
    """Any user can create `lease-<bytes>.json` in the shared state directory. Every call that
    warns about it must still work, with the bytes shown as \\xNN (not UnicodeDecodeError from
    converting the warning)."""
    host_path = host("4x24g")
    state_dir.mkdir(mode=0o1777, exist_ok=True)
    hostile = os.path.join(os.fsencode(state_dir), b"lease-\xff\xfe.json")
    with open(hostile, "w") as out:
        out.write("not a lease")
    out = python_run("""
        import json, logging, gpuslot
        warned = []
        class Keep(logging.Handler):
            def emit(self, record):
                warned.append(record.getMessage())
        logging.getLogger("gpuslot").addHandler(Keep(level=logging.WARNING))
        status = gpuslot.status()
        status_warnings, warned[:] = list(warned), []
        with gpuslot.lease(mem="1G") as held:
            leased = held.nvml_indices
        lease_warnings = list(warned)
        chosen = gpuslot.select_best_gpu(1)
        device = gpuslot.resolve_device("auto")
        print(json.dumps({"status_warnings": status_warnings, "gpus": len(status["gpus"]), "leased": leased,
                          "lease_warnings": lease_warnings, "chosen": chosen, "device": device}))
    """, host=host_path)
    result = json.loads(out.stdout)
    assert result["gpus"] == 4 and result["leased"] == [0] and result["chosen"] == 0 and result["device"].startswith("cuda:")
    for warnings in (result["status_warnings"], result["lease_warnings"]):
        assert any("lease-\\xff\\xfe.json" in line for line in warnings), warnings


def test_an_error_naming_a_path_that_is_not_utf8_is_still_the_gpuslot_error(python_run, host):
    out = python_run("""
        import gpuslot
        try:
            gpuslot.lease(mem="1G")
        except gpuslot.StateDirectoryError as e:
            print(str(e))
    """, host="4x24g", env={"GPUSLOT_STATE_DIR": "/proc/\udcff/state"})
    assert out.stdout.startswith("cannot create state directory /proc/\\xff/state"), out.stdout + out.stderr
