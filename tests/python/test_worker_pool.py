"""gpuslot.WorkerPool: one persistent worker per GPU, a shared queue, memory leased before each
worker starts, tasks requeued on another GPU after out of memory or a worker's death, results in
submission order, no task lost.

Workers log every attempt to a file ("start <item> <pid> <device>"), so a test can tell where
each attempt ran after the fact.
"""
import json
import os
import signal
import time

from conftest import wait_until, read_host, write_host, read_text

# The workers of most tests: init records the device; work logs the attempt, fails as the item
# asks, and returns (item squared, device, pid).
_PROGRAM = r"""
import os, sys, time, signal, json
import gpuslot
LOG = os.environ["ATTEMPTS"]
MARKS = os.environ["MARKS"]
device = None

def init(dev):
    global device
    device = dev

def first_time(tag):
    try:
        os.close(os.open(os.path.join(MARKS, tag), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False

def work(item):
    with open(LOG, "a") as log:
        log.write("start %s %d %s\n" % (item, os.getpid(), device))
    time.sleep(float(os.environ.get("TASK_SECONDS", "0")))
    if item % 10 == 3 and first_time("oom-%d" % item):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU %s; 23.69 GiB total capacity)" % device)
    if item == int(os.environ.get("ALWAYS_OOM", "-1")):
        raise RuntimeError("CUDA error: CUDA_ERROR_OUT_OF_MEMORY")
    if item == int(os.environ.get("BAD_ITEM", "-1")):
        raise ValueError("item %d is malformed" % item)
    return item * item, device, os.getpid()
"""


def _attempts(path):
    rows = []
    for line in read_text(path).splitlines():
        _, item, pid, device = line.split()
        rows.append((int(item), int(pid), device))
    return rows


def _env(tmp_path, **extra):
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    env = {"ATTEMPTS": tmp_path / "attempts.log", "MARKS": marks}
    env.update(extra)
    return env


def test_200_tasks_on_4_gpus_with_out_of_memory_and_a_killed_worker(python_run, host, tmp_path):
    # 20 of the 200 items run out of GPU memory on their first attempt; one worker is SIGKILLed
    # while it runs a task. Every result must come back, right and in order.
    script = _PROGRAM + r"""
import threading
killed = {}
pool = gpuslot.WorkerPool(init, work, mem="4G", gpus=None, retries=3)

def kill_one_busy_worker():
    log = os.environ["ATTEMPTS"]
    while sum(1 for _ in open(log)) < 60 if os.path.exists(log) else True:
        time.sleep(0.01)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for worker in pool.workers():
            if worker["state"] == "busy" and worker["pid"] > 0:
                killed.update(worker)
                os.kill(worker["pid"], signal.SIGKILL)
                return
        time.sleep(0.002)

killer = threading.Thread(target=kill_one_busy_worker)
killer.start()
results = pool.map(range(200))
killer.join()
after = pool.workers()
pool.close()
print(json.dumps({"results": results, "killed": killed, "after": after}))
"""
    started = time.monotonic()
    out = python_run(script, host="4x24g", env=_env(tmp_path, TASK_SECONDS="0.02"), timeout=120)

    report = json.loads(out.stdout)
    results = report["results"]

    # Complete, correct, in submission order.
    assert [value for value, _, _ in results] == [item * item for item in range(200)]
    # All four GPUs worked.
    assert sorted({device for _, device, _ in results}) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]

    attempts = _attempts(tmp_path / "attempts.log")
    by_item = {}
    for item, pid, device in attempts:
        by_item.setdefault(item, []).append((pid, device))
    assert sorted(by_item) == list(range(200))  # no task lost
    # Each out-of-memory task was tried again, and on another GPU (the other three were free).
    for item in range(3, 200, 10):
        tries = by_item[item]
        assert len(tries) >= 2, (item, tries)
        assert tries[1][1] != tries[0][1], (item, tries)
    # The killed worker's task was run again by another worker, and the worker was replaced on
    # the same GPU by a new process.
    killed = report["killed"]
    assert killed, "no busy worker to kill"
    # Every task the killed worker started either finished there before the kill (the status
    # read and the kill are not atomic) or was run again by another worker; its result is right
    # either way (checked above).
    for item in {item for item, pid, _ in attempts if pid == killed["pid"]}:
        finished_there = results[item][2] == killed["pid"]
        assert finished_there or any(pid != killed["pid"] for pid, _ in by_item[item]), (item, by_item[item])
    replacement = [worker for worker in report["after"] if worker["worker"] == killed["worker"]][0]
    assert replacement["device"] == killed["device"] and replacement["pid"] != killed["pid"]


def test_a_task_that_always_runs_out_of_memory_fails_after_its_retries(python_run, host, tmp_path):
    script = _PROGRAM + r"""
with gpuslot.WorkerPool(init, work, mem="4G", retries=3) as pool:
    results = pool.map(range(20), return_exceptions=True)
failed = [(i, r) for i, r in enumerate(results) if isinstance(r, Exception)]
index, error = failed[0]
print(json.dumps({"failed": [i for i, _ in failed], "type": type(error).__name__, "attempts": error.attempts,
                  "history": error.history, "message": str(error), "index": error.index,
                  "ok": [r[0] for r in results if not isinstance(r, Exception)]}))
try:
    with gpuslot.WorkerPool(init, work, mem="4G", retries=1) as pool:
        pool.map([7, 8])
except gpuslot.TaskFailed as error:
    print(json.dumps({"raised": error.index, "attempts": error.attempts}))
"""
    out = python_run(script, host="4x24g", env=_env(tmp_path, ALWAYS_OOM=7)).stdout.splitlines()
    report = json.loads(out[0])
    assert report["failed"] == [7] and report["index"] == 7
    assert report["type"] == "TaskFailed"
    assert report["attempts"] == 4  # the first try and 3 retries
    assert len(report["history"]) == 4 and all("out of memory" in line for line in report["history"])
    # Every attempt on a different GPU: a requeued task goes where it has not failed yet.
    assert len({line.split(" on ")[1].split(" ")[0] for line in report["history"]}) == 4
    assert report["message"].startswith("gave up after 4 attempts (retries=3)")
    assert report["ok"] == [i * i for i in range(20) if i != 7]
    assert json.loads(out[1]) == {"raised": 0, "attempts": 2}


def test_any_other_exception_fails_the_task_at_once_with_the_worker_exception(python_run, host, tmp_path):
    script = _PROGRAM + r"""
with gpuslot.WorkerPool(init, work, mem="4G") as pool:
    future = pool.submit(5)
    try:
        future.result(timeout=30)
    except gpuslot.TaskFailed as error:
        print(json.dumps({"attempts": error.attempts, "message": str(error), "cause": repr(error.__cause__),
                          "traceback": "ValueError: item 5 is malformed" in error.remote_traceback}))
    print(pool.submit(4).result(timeout=30)[0])
"""
    out = python_run(script, host="4x24g", env=_env(tmp_path, BAD_ITEM=5)).stdout.splitlines()
    assert json.loads(out[0]) == {"attempts": 1, "message": "ValueError: item 5 is malformed",
                                  "cause": "ValueError('item 5 is malformed')", "traceback": True}
    assert out[1] == "16"


def test_memory_is_checked_and_leased_before_each_worker_starts(python_run, host, gpuslot, tmp_path):
    # GPUs 0 and 1 have 4 GiB free; a pool needing 8 GiB per worker runs on GPUs 2 and 3 only,
    # and holds one lease per worker while it runs.
    host_path = host("4x24g")
    data = read_host(host_path)
    for gpu in data["gpus"][:2]:
        gpu["memory_used_mib"] = 20 * 1024
    write_host(host_path, data)
    script = _PROGRAM + r"""
import subprocess
with gpuslot.WorkerPool(init, work, mem="8G") as pool:
    devices = sorted({r[1] for r in pool.map(range(40))})
    leases = json.loads(subprocess.run([os.environ["GPUSLOT"], "leases", "--json"], capture_output=True, text=True).stdout)
print(json.dumps({"devices": devices, "leases": [(l["gpus"], l["reserved"], l["command"].split(":")[0]) for l in leases["leases"]]}))
"""
    out = python_run(script, host=host_path, env=_env(tmp_path, GPUSLOT=gpuslot("--version").args[0])).stdout
    report = json.loads(out)
    assert report["devices"] == ["cuda:2", "cuda:3"]
    assert sorted(report["leases"]) == [[[2], 8 << 30, "WorkerPool"], [[3], 8 << 30, "WorkerPool"]]
    assert json.loads(gpuslot("leases", "--json", host=host_path, check=0).stdout)["leases"] == []


def test_the_pool_waits_for_room_when_no_worker_can_start(python_spawn, python_run, host, state_dir, tmp_path):
    host_path = host("1x4090")
    holder = python_spawn("""
        import glob, os, time, gpuslot
        held = gpuslot.lease(mem="20G")
        print("holding", flush=True)
        # Released once the pool has queued for room (its wait ticket is in the state directory).
        while not glob.glob(os.path.join(os.environ["GPUSLOT_STATE_DIR"], "wait-*")):
            time.sleep(0.01)
        time.sleep(0.2)
        held.release()
        print("released", flush=True)
        time.sleep(60)
    """, host_path)
    wait_until(lambda: "holding" in holder.stdout_text(), what="the holder")
    script = _PROGRAM + r"""
with gpuslot.WorkerPool(init, work, mem="8G") as pool:
    values = [r[0] for r in pool.map(range(5))]
print(values, os.path.exists(os.environ["ATTEMPTS"]))
try:
    blocker = gpuslot.lease(mem="20G")
    with gpuslot.WorkerPool(init, work, mem="8G", timeout=0.5) as pool:
        pool.map([1])
except gpuslot.Timeout as error:
    print("Timeout", error)
try:
    with gpuslot.WorkerPool(init, work, mem="8G", wait=False) as pool:
        pool.map([1])
except gpuslot.NoGpuAvailable as error:
    print("NoGpuAvailable", error)
"""
    out = python_run(script, host=host_path, env=_env(tmp_path)).stdout.splitlines()
    assert out[0] == "[0, 1, 4, 9, 16] True"
    assert "released" in holder.stdout_text()
    assert out[1].startswith("Timeout timed out waiting for room")
    assert out[2].startswith("NoGpuAvailable no GPU fits now") and out[2].endswith("(the pool was told not to wait)")


def test_init_failure_stops_the_pool_and_fails_every_task(python_run, host, tmp_path):
    out = python_run(r"""
import gpuslot
def init(device):
    raise ImportError("no module named 'whisper'")
with gpuslot.WorkerPool(init, abs, mem="1G") as pool:
    future = pool.submit(1)
    try:
        pool.map([1, 2, 3])
    except gpuslot.WorkerInitFailed as error:
        print(type(error).__name__, error)
    print(type(future.exception(timeout=10)).__name__)
    try:
        pool.submit(4)
    except gpuslot.GpuslotError as error:
        print(type(error).__name__)
""", host="4x24g").stdout.splitlines()
    assert out[0].startswith("WorkerInitFailed worker init on cuda:")
    assert out[0].endswith("failed: ImportError: no module named 'whisper'")
    assert out[1] == "TaskFailed"
    assert out[2] == "InternalError"


def test_out_of_memory_in_init_gives_the_gpu_back_and_tries_another(python_run, host, tmp_path):
    # The first worker to start on GPU 0 finds its memory taken (as if by a process outside
    # gpuslot): the pool gives GPU 0 back and starts that worker elsewhere.
    out = python_run(r"""
import os, gpuslot
MARKS = os.environ["MARKS"]
def init(device):
    if device == "cuda:0":
        try:
            os.close(os.open(os.path.join(MARKS, "init"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        raise RuntimeError("CUDA out of memory. Tried to allocate 7.00 GiB")
def work(item):
    return item
with gpuslot.WorkerPool(init, work, mem="4G", gpus=1) as pool:
    print(pool.map(range(3)), [w["device"] for w in pool.workers()])
""", host="4x24g", env=_env(tmp_path)).stdout.strip()
    assert out == "[0, 1, 2] ['cuda:1']"


def test_futures_and_cancel(python_run, host, tmp_path):
    out = python_run(_PROGRAM + r"""
import concurrent.futures
with gpuslot.WorkerPool(init, work, mem="4G", gpus=1) as pool:
    futures = [pool.submit(i) for i in range(30)]
    late = futures[-1]
    print(late.cancel() or late.cancelled())
    done = [f.result(timeout=30)[0] for f in futures[:-1]]
    print(done == [i * i for i in range(29)])
    queued = [pool.submit(i) for i in range(50)]
print(all(f.done() for f in queued), any(f.cancelled() for f in queued))
""", host="4x24g", env=_env(tmp_path, TASK_SECONDS="0.01")).stdout.split()
    assert out == ["True", "True", "True", "True"]


def test_killing_the_pool_process_kills_its_workers_and_frees_their_leases(python_spawn, host, gpuslot, tmp_path):
    host_path = host("4x24g")
    pool = python_spawn(_PROGRAM + r"""
pool = gpuslot.WorkerPool(init, work, mem="4G")
pool.map(range(8))
print(" ".join(str(w["pid"]) for w in pool.workers()), flush=True)
time.sleep(60)
""", host_path, env=_env(tmp_path))
    pids = [int(pid) for pid in wait_until(lambda: pool.stdout_text().split(), what="the worker pids")]
    assert len(pids) == 4
    assert len(json.loads(gpuslot("leases", "--json", host=host_path, check=0).stdout)["leases"]) == 4
    os.kill(pool.pid, signal.SIGKILL)
    pool.wait()

    def gone(pid):
        try:
            with open("/proc/%d/stat" % pid) as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    wait_until(lambda: all(gone(pid) for pid in pids), timeout=5, what="the workers to die with their pool")
    assert json.loads(gpuslot("leases", "--json", host=host_path, check=0).stdout)["leases"] == []


def test_workers_use_the_gpu_memory_their_lease_reserved(python_run, host, gpuslot, fake_gpu_job, tmp_path):
    # Each worker's init starts a fake GPU job holding 5 GiB on its GPU (as a model would): NVML
    # shows it, and the ledger credits it to the pool's lease instead of counting it twice.
    host_path = host("4x24g")
    out = python_run(r"""
import json, os, subprocess, time, gpuslot
jobs = []
def init(device):
    index = device.split(":")[1]   # no CUDA_VISIBLE_DEVICES here: cuda:N is NVML index N
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=index, CUDA_DEVICE_ORDER="PCI_BUS_ID")
    job = subprocess.Popen([os.environ["FAKE_GPU_JOB"], "--mem", "5G", "--seconds", "20"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert "holding" in job.stdout.readline()   # the model is loaded: its memory shows in NVML
    job.stdout.close()
    jobs.append(job)
def work(item):
    return item
with gpuslot.WorkerPool(init, work, mem="6G", gpus=2) as pool:
    pool.map(range(2))
    while [w["state"] for w in pool.workers()] != ["idle", "idle"]:   # both models loaded
        time.sleep(0.01)
    status = gpuslot.status()
print(json.dumps([(g["index"], g["memory"]["reserved"], [l["in_use"] for l in g["leases"]]) for g in status["gpus"]]))
""", host=host_path, env={"FAKE_GPU_JOB": fake_gpu_job}).stdout
    by_gpu = json.loads(out)
    assert by_gpu[0] == [0, 1 << 30, [5 << 30]]  # 6 GiB reserved, 5 in use: 1 outstanding
    assert by_gpu[1] == [1, 1 << 30, [5 << 30]]
    assert by_gpu[2][2] == [] and by_gpu[3][2] == []


def test_close_with_a_bad_grace_is_refused_and_the_pool_stays_usable(python_run, host, gpuslot):
    host_path = host("4x24g")
    out = python_run("""
        import gpuslot
        pool = gpuslot.WorkerPool(None, abs, mem="1G", gpus=2)
        print(pool.map([-1, -2]))
        for grace in (-1, float("nan"), "soon"):
            try:
                pool.close(grace=grace)
            except gpuslot.BadInput as error:
                print("refused", "grace" in str(error))
        print(pool.map([-3]))
        pool.close()
        print(repr(pool))
        try:
            pool.map([-4])
        except ValueError as error:  # BadInput: a usage error, like I/O on a closed file
            print(type(error).__name__, "closed" in str(error))
    """, host=host_path).stdout.splitlines()
    assert out == ["[1, 2]", "refused True", "refused True", "refused True", "[3]", "<gpuslot.WorkerPool closed>",
                   "BadInput True"]
    assert gpuslot("leases", "--json", host=host_path, check=0).stdout.count('"id"') == 0


def test_a_result_that_cannot_be_unpickled_here_is_that_tasks_failure(python_run, host):
    """The worker pickles what work returned; the pool's process cannot rebuild it. Only that
    task fails (TaskFailed), in map and in submit; the other results are kept."""
    out = python_run("""
        import gpuslot

        def rebuild(value):
            raise RuntimeError("cannot rebuild %s here" % value)

        class Unwelcome:
            def __reduce__(self):
                return (rebuild, ("it",))

        def work(item):
            return Unwelcome() if item == "bad" else item.upper()

        class Unprintable(Exception):
            def __str__(self):
                raise RuntimeError("no message")

        def fails(item):
            raise Unprintable()

        with gpuslot.WorkerPool(None, work, mem="1G", gpus=1) as pool:
            results = pool.map(["ok", "bad", "fine"], return_exceptions=True)
            print(results[0], type(results[1]).__name__, results[2])
            print(results[1].index, "could not be unpickled" in str(results[1]), "cannot rebuild it" in str(results[1]))
            try:
                pool.submit("bad").result(timeout=30)
            except gpuslot.TaskFailed as error:
                print("submit", type(error.__cause__).__name__)
        with gpuslot.WorkerPool(None, fails, mem="1G", gpus=1, retries=0) as pool:
            try:
                pool.map([1])
            except gpuslot.TaskFailed as error:
                print(repr(str(error)))
    """, host="4x24g").stdout.splitlines()
    assert out[:3] == ["OK TaskFailed FINE", "1 True True", "submit RuntimeError"], out
    assert "Unprintable" in out[3] and "\\n" not in out[3], out


def test_a_result_callback_may_close_the_pool_drop_it_but_not_wait_for_it(python_run, host, gpuslot):
    """Callbacks run on the pool's own thread. The last reference to a pool dropped there (a
    closure), or close() called there, must stop the pool, not abort the interpreter; map()
    there cannot be served (that thread is the one that delivers) and says so."""
    host_path = host("4x24g")
    out = python_run("""
        import threading, time, gpuslot

        said = []
        finished = threading.Event()

        def dropped_in_its_callback():
            pool = gpuslot.WorkerPool(None, abs, mem="1G", gpus=1)
            pool.submit(-1).add_done_callback(lambda future: (said.append(("dropped", future.result(), repr(pool))),
                                                               finished.set()))

        dropped_in_its_callback()
        assert finished.wait(30)
        finished.clear()

        pool = gpuslot.WorkerPool(None, abs, mem="1G", gpus=1)

        def in_callback(future):
            try:
                pool.map([1])
            except gpuslot.BadInput as error:
                said.append(("map", str(error)))
            pool.close()
            said.append(("closed", repr(pool)))
            finished.set()

        pool.submit(-2).add_done_callback(in_callback)
        assert finished.wait(30)
        time.sleep(1)
        for entry in said:
            print(entry)
    """, host=host_path, timeout=60)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("('dropped', 1, '<gpuslot.WorkerPool"), out
    assert lines[1] == "('map', 'a worker pool cannot be waited for from its own result callback')", out
    assert lines[2] == "('closed', '<gpuslot.WorkerPool closed>')", out
    wait_until(lambda: '"id"' not in gpuslot("leases", "--json", host=host_path, check=0).stdout, timeout=10,
               what="the pools' leases to be released")
