#!/usr/bin/python3
"""Benchmarks of the lease ledger and `gpuslot run` through the fake NVML (Debian python3 only).

    python3 bench/bench_leases.py [--build build] [--quick] [--no-strace]

1. Reserve latency: N launches of `gpuslot run --mem 1M -- touch MARK` started together on
   tests/hosts/64x80g.json (everything fits, so only the ledger is measured), N = 1, 16, 64.
   - launch latency: spawn of `gpuslot run` -> its child running (the marker's mtime);
   - whole-process latency of `gpuslot run --mem 1M -- true` (spawn -> reaped);
   - the same whole-process latency for `gpuslot --version` (process start-up alone) and
     `gpuslot pick --mem 1M` (start-up + NVML snapshot, no lock, no lease): the baselines that
     tell the ledger's share apart from process start-up on a loaded machine.
   - with strace (on flock/rename/execve only, --seccomp-bpf): per launch, how long it waited for
     the host lock and how long it held it (flock -> lease published by rename). Only for N = 64;
     strace slows what it traces, so these figures are for where the time goes, not for targets.
2. The herd: 64 `gpuslot run --mem 10G --wait -- fake-gpu-job --mem 10G --seconds 2` started
   together on tests/hosts/4x24g.json (4 x 24 GiB; two jobs fit per GPU). Placement quality
   (most jobs at once on one GPU from job records, out-of-memory failures, jobs per GPU against
   the ideal 16), and wall time against ideal = 64 x 2 s / 8 slots = 16 s.
3. The control: the same herd through plain `CUDA_VISIBLE_DEVICES=$(gpuslot pick --mem 10G)`,
   no lease: its out-of-memory count; and once more with every job picking before any allocates
   (a barrier between pick and allocation stands for the model-loading time of the seed race).

Targets (issue "leases"): p99 reserve latency under 20 ms at 64 concurrent launches; herd wall
within 1.15 x ideal; herd overcommit 0. Prints a Markdown report on stdout.
"""
import argparse
import collections
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1]
GiB = 1 << 30


def percentile(values, fraction):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def summary_ms(values):
    return "%.1f / %.1f" % (statistics.median(values) * 1e3, percentile(values, 0.99) * 1e3)


class Bench:
    def __init__(self, build):
        self.build = Path(build).resolve()
        self.gpuslot = self.build / "bin" / "gpuslot"
        self.job = self.build / "libexec" / "gpuslot" / "fake-gpu-job"
        self.nvml = self.build / "libexec" / "gpuslot" / "libnvidia-ml.so.1"
        for path in (self.gpuslot, self.job, self.nvml):
            if not path.exists():
                sys.exit("bench_leases: %s is missing; build first (ninja -C %s)" % (path, build))
        self.work = Path(tempfile.mkdtemp(prefix="gpuslot-bench-leases-"))
        self.devnull = os.open(os.devnull, os.O_WRONLY)

    def fresh(self, host_name):
        """A private copy of a host file and an empty state directory; returns the environment."""
        folder = Path(tempfile.mkdtemp(dir=self.work))
        host = folder / (host_name + ".json")
        shutil.copyfile(SOURCE / "tests" / "hosts" / (host_name + ".json"), host)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUSLOT_", "CUDA_", "NVIDIA_", "SLURM_"))}
        env.update(GPUSLOT_NVML_LIBRARY=str(self.nvml), GPUSLOT_FAKE_NVML_HOST=str(host),
                   GPUSLOT_STATE_DIR=str(folder / "state"), NO_COLOR="1")
        return folder, env

    # --- 1. reserve latency ------------------------------------------------------------------

    def burst(self, argv_of, env, count, stdout_of=None):
        """Spawns count processes back to back (posix_spawn), reaps them; returns
        [(spawned_at_realtime, latency_s)]. stdout_of(i): a file for process i's stdout."""
        started = {}
        for i in range(count):
            argv = argv_of(i)
            actions = [(os.POSIX_SPAWN_DUP2, self.devnull, 2)]
            if stdout_of is None:
                actions.append((os.POSIX_SPAWN_DUP2, self.devnull, 1))
            else:
                actions.append((os.POSIX_SPAWN_OPEN, 1, str(stdout_of(i)), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            wall, mono = time.time(), time.monotonic()
            pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
            started[pid] = (i, wall, mono)
        results = [None] * count
        for _ in range(count):
            pid, status = os.waitpid(-1, 0)
            i, wall, mono = started.pop(pid)
            if status != 0:
                raise SystemExit("bench_leases: %s exited with status %#x" % (" ".join(argv_of(i)), status))
            results[i] = (wall, time.monotonic() - mono)
        return results

    def reserve_latency(self, counts, samples_per_count):
        rows = []
        for count in counts:
            repetitions = max(3, samples_per_count // count)
            folder, env = self.fresh("64x80g")
            marks = folder / "marks"
            marks.mkdir()
            gpuslot = str(self.gpuslot)
            launch, run_total, version, pick = [], [], [], []
            self.burst(lambda i: [gpuslot, "run", "--mem", "1M", "--", "/bin/true"], env, 1)  # warm caches
            date = shutil.which("date") or "/bin/date"
            for repetition in range(repetitions):
                def mark_of(i, repetition=repetition):
                    return marks / ("%d-%d" % (repetition, i))
                # The child prints the time it runs (CLOCK_REALTIME, ns) into gpuslot's stdout file.
                spawned = self.burst(lambda i: [gpuslot, "run", "--mem", "1M", "--", date, "+%s.%N"], env, count,
                                     stdout_of=mark_of)
                for i, (spawned_at, _) in enumerate(spawned):
                    launch.append(float(mark_of(i).read_text()) - spawned_at)
                run_total += [lat for _, lat in self.burst(lambda i: [gpuslot, "run", "--mem", "1M", "--", "/bin/true"], env, count)]
                version += [lat for _, lat in self.burst(lambda i: [gpuslot, "--version"], env, count)]
                pick += [lat for _, lat in self.burst(lambda i: [gpuslot, "pick", "--mem", "1M"], env, count)]
            rows.append((count, len(launch), launch, run_total, version, pick))
        return rows

    def lock_profile(self, count, repetitions):
        """Per launch: wait for the host lock and hold time, from an strace of flock/rename only."""
        strace = shutil.which("strace")
        if strace is None:
            return None
        folder, env = self.fresh("64x80g")
        waits, holds, startup = [], [], []
        for repetition in range(repetitions):
            trace = folder / ("trace-%d" % repetition)
            if count == 1:  # one after the other: the uncontended cost
                script = "for i in $(seq 32); do \"$GS\" run --mem 1M -- /bin/true; done"
            else:
                script = "for i in $(seq %d); do \"$GS\" run --mem 1M -- /bin/true & done; wait" % count
            subprocess.run([strace, "-f", "--seccomp-bpf", "-qq", "-ttt", "-T", "-e", "trace=execve,flock,rename",
                            "-o", str(trace), "sh", "-c", script], env={**env, "GS": str(self.gpuslot)},
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            exec_at, lock_at = {}, {}
            for pid, call, began, took, text in strace_calls(trace.read_text()):
                if call == "execve" and str(self.gpuslot) in text and "= 0" in text:
                    exec_at[pid] = began + took
                elif call == "flock" and "LOCK_EX" in text and "LOCK_NB" not in text:
                    waits.append(took)
                    lock_at[pid] = began + took
                    if pid in exec_at:
                        startup.append(began - exec_at.pop(pid))
                elif call == "rename" and "/lease-" in text and pid in lock_at:
                    holds.append(began + took - lock_at.pop(pid))
        return {"count": count, "samples": len(holds), "wait": waits, "hold": holds, "startup": startup}

    # --- 2./3. the herd and its control ------------------------------------------------------

    def herd(self, jobs=64, seconds=2):
        folder, env = self.fresh("4x24g")
        record = folder / "records"
        job = ('echo "start $JOB_ID $(date +%s.%N) $CUDA_VISIBLE_DEVICES" >> "$RECORD"; '
               '"$JOB" --mem 10G --seconds ' + str(seconds) + '; s=$?; '
               'echo "end $JOB_ID $(date +%s.%N) $CUDA_VISIBLE_DEVICES $s" >> "$RECORD"; exit $s')
        began = time.monotonic()
        processes = [subprocess.Popen([str(self.gpuslot), "run", "--mem", "10G", "--wait", "--", "sh", "-c", job],
                                      env={**env, "JOB_ID": str(i), "RECORD": str(record), "JOB": str(self.job)},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for i in range(jobs)]
        errors = [process.communicate()[1] for process in processes]
        wall = time.monotonic() - began
        starts, ends = {}, {}
        for line in record.read_text().splitlines():
            fields = line.split()
            (starts if fields[0] == "start" else ends)[fields[1]] = (float(fields[2]), fields[3])
        intervals = collections.defaultdict(list)
        for job_id, (start, gpu) in starts.items():
            if job_id in ends:
                intervals[gpu].append((start, ends[job_id][0]))
        most = {gpu: max_overlap(spans) for gpu, spans in intervals.items()}
        per_gpu = {gpu: len(spans) for gpu, spans in sorted(intervals.items())}
        return {
            "wall": wall,
            "ideal": jobs * seconds / 8,
            "failed": sum(process.returncode != 0 for process in processes),
            "oom": sum("out of memory" in error for error in errors),
            "internal": sum("internal error" in error for error in errors),
            "most_at_once": max(most.values()) if most else 0,
            "per_gpu": per_gpu,
            "spread": max(per_gpu.values()) - min(per_gpu.values()) if per_gpu else 0,
        }

    def control(self, jobs=64, seconds=2, loading=False):
        """loading: every job picks, then waits until all have picked before allocating (the model
        loading time of the seed scenario: none has allocated when the others pick)."""
        folder, env = self.fresh("4x24g")
        ready, go = folder / "ready", folder / "go"
        ready.mkdir()
        if loading:
            script = ('gpu=$("$GS" pick --mem 10G); touch "$READY/$$"; while [ ! -e "$GO" ]; do sleep 0.01; done; '
                      'CUDA_VISIBLE_DEVICES=$gpu exec "$JOB" --mem 10G --seconds ' + str(seconds))
        else:
            script = 'CUDA_VISIBLE_DEVICES=$("$GS" pick --mem 10G) exec "$JOB" --mem 10G --seconds ' + str(seconds)
        began = time.monotonic()
        processes = [subprocess.Popen(["sh", "-c", script],
                                      env={**env, "GS": str(self.gpuslot), "JOB": str(self.job), "READY": str(ready),
                                           "GO": str(go)},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for _ in range(jobs)]
        if loading:
            while len(os.listdir(ready)) < jobs and time.monotonic() - began < 60:
                time.sleep(0.01)
            go.touch()
        errors = [process.communicate()[1] for process in processes]
        return {
            "wall": time.monotonic() - began,
            "failed": sum(process.returncode != 0 for process in processes),
            "oom": sum("CUDA out of memory" in error for error in errors),
            "no_gpu": sum("No CUDA GPUs are available" in error for error in errors),
        }


def strace_calls(text):
    """(pid, call, start, duration, text) per completed system call in `strace -f -ttt -T` output,
    joining "<unfinished ...>" and "<... resumed>" halves."""
    pending = {}
    for line in text.splitlines():
        match = re.match(r"(\d+)\s+([\d.]+)\s+(.*)$", line)
        if not match:
            continue
        pid, at, rest = match.group(1), float(match.group(2)), match.group(3)
        if rest.endswith("<unfinished ...>"):
            call = rest.split("(", 1)[0]
            pending[(pid, call)] = (at, rest)
            continue
        resumed = re.match(r"<\.\.\. (\w+) resumed>(.*)<([\d.]+)>$", rest)
        if resumed:
            call = resumed.group(1)
            began, first = pending.pop((pid, call), (at, ""))
            yield pid, call, began, float(resumed.group(3)), first + resumed.group(2)
            continue
        complete = re.match(r"(\w+)\((.*)<([\d.]+)>$", rest)
        if complete:
            yield pid, complete.group(1), at, float(complete.group(3)), rest


def max_overlap(intervals):
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    best = current = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


def machine():
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "%d CPUs (nproc), %s, Linux %s, Python %s" % (os.cpu_count(), model, platform.release(), platform.python_version())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", default=str(SOURCE / "build"))
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--no-strace", action="store_true", help="skip the lock profile")
    parser.add_argument("--herds", type=int, default=3, help="herd and control repetitions (default 3)")
    options = parser.parse_args()
    bench = Bench(options.build)
    try:
        print("## gpuslot lease benchmark\n\nmachine: %s\n" % machine())
        samples = 64 if options.quick else 512
        print("### 1. reserve latency, tests/hosts/64x80g.json (ms, median / p99)\n")
        print("| concurrent | samples | launch (spawn -> child runs) | run --mem 1M -- true | --version | pick --mem 1M |")
        print("|---:|---:|---:|---:|---:|---:|")
        for count, n, launch, run_total, version, pick in bench.reserve_latency([1, 16, 64], samples):
            print("| %d | %d | %s | %s | %s | %s |" % (count, n, summary_ms(launch), summary_ms(run_total),
                                                      summary_ms(version), summary_ms(pick)))
            sys.stdout.flush()
        if not options.no_strace:
            print("\nhost lock (strace --seccomp-bpf on execve/flock/rename only; ms, median / p99):\n")
            print("| concurrent | launches | exec -> lock request | wait for the lock | lock held until the lease is published |")
            print("|---:|---:|---:|---:|---:|")
            for count in (1, 64):
                profile = bench.lock_profile(count, 2 if options.quick else 4)
                if profile and profile["samples"]:
                    print("| %d | %d | %s | %s | %s |" % (count, profile["samples"], summary_ms(profile["startup"]),
                                                       summary_ms(profile["wait"]), summary_ms(profile["hold"])))
        print("\n### 2./3. the herd (64 x 10 GiB x 2 s on tests/hosts/4x24g.json) and the control\n")
        print("| run | wall s | wall / ideal 16 s | failed | OOM | internal errors | most jobs at once on a GPU | jobs per GPU (ideal 16) |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        herds = []
        for repetition in range(1 if options.quick else options.herds):
            result = bench.herd()
            herds.append(result)
            print("| herd %d | %.2f | %.3f | %d | %d | %d | %d | %s |" % (
                repetition + 1, result["wall"], result["wall"] / result["ideal"], result["failed"], result["oom"],
                result["internal"], result["most_at_once"], " ".join("%s" % v for v in result["per_gpu"].values())))
            sys.stdout.flush()
        for repetition in range(1 if options.quick else options.herds):
            result = bench.control()
            print("| control %d (pick, no lease) | %.2f | | %d | %d | | | %d found no GPU |" % (
                repetition + 1, result["wall"], result["failed"], result["oom"], result["no_gpu"]))
            sys.stdout.flush()
        result = bench.control(loading=True)
        print("| control, all pick before any loads (pick, no lease) | %.2f | | %d | %d | | | %d found no GPU |" % (
            result["wall"], result["failed"], result["oom"], result["no_gpu"]))
    finally:
        shutil.rmtree(bench.work, ignore_errors=True)


if __name__ == "__main__":
    main()
