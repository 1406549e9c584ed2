#!/usr/bin/env python3
"""Benchmarks of `gpuslot batch` (issue "batch"): dispatch overhead against task-spooler and GNU
parallel, placement quality against one-job-per-GPU, and the scheduler's memory with 100 000 jobs.

    python3 bench/bench_batch.py --build build [--quick] [--only dispatch|placement|memory]

Needs Debian's `task-spooler` (tsp) and `parallel`. Uses the fake NVML of the build; every run
gets a private host file copy, state directory and working directory under a temp folder.
"""
import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent


class Bench:
    def __init__(self, build, work):
        self.build = Path(build).resolve()
        self.gpuslot = self.build / "bin" / "gpuslot"
        self.fake_nvml = self.build / "libexec" / "gpuslot" / "libnvidia-ml.so.1"
        self.fake_gpu_job = self.build / "libexec" / "gpuslot" / "fake-gpu-job"
        self.work = Path(work)
        self.counter = 0

    def fresh(self, host_name, state_on_tmpfs=False):
        self.counter += 1
        folder = self.work / ("run%03d" % self.counter)
        folder.mkdir()
        host = folder / "host.json"
        shutil.copyfile(SOURCE / "tests" / "hosts" / (host_name + ".json"), host)
        state = Path("/dev/shm") / ("gpuslot-bench-%d-%d" % (os.getpid(), self.counter)) if state_on_tmpfs else folder / "state"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUSLOT_", "CUDA_", "SLURM_"))}
        env.update(GPUSLOT_NVML_LIBRARY=str(self.fake_nvml), GPUSLOT_FAKE_NVML_HOST=str(host),
                   GPUSLOT_STATE_DIR=str(state), NO_COLOR="1")
        return folder, host, env

    # --- (a) dispatch ------------------------------------------------------------------------------
    def dispatch_gpuslot(self, jobs, extra=(), state_on_tmpfs=False):
        folder, host, env = self.fresh("8x24g", state_on_tmpfs)
        jobs_file = folder / "jobs.txt"
        jobs_file.write_text("true\n" * jobs)
        start = time.perf_counter()
        done = subprocess.run([str(self.gpuslot), "batch", str(jobs_file), *extra], env=env, cwd=folder,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit("gpuslot batch failed: %s" % done.stderr[-2000:])
        status = json.loads(subprocess.run([str(self.gpuslot), "batch", "--status", str(jobs_file) + ".gpuslot.db", "--json"],
                                           env=env, capture_output=True, text=True, check=True).stdout)
        assert sum(job["state"] == "succeeded" for job in status["jobs"]) == jobs
        if state_on_tmpfs:
            shutil.rmtree(env["GPUSLOT_STATE_DIR"], ignore_errors=True)
        return elapsed

    def dispatch_tsp(self, jobs):
        folder, _, env = self.fresh("8x24g")
        env.update(TS_SOCKET=str(folder / "ts.socket"), TMPDIR=str(folder), TS_MAXFINISHED=str(jobs + 10))
        start = time.perf_counter()
        subprocess.run(["tsp", "-S", "8"], env=env, check=True, stdout=subprocess.DEVNULL)
        last = None
        for _ in range(jobs):
            last = subprocess.run(["tsp", "true"], env=env, check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run(["tsp", "-w", last], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # -w returns when the last job ends; the earlier ones may still run: wait for all.
        while "running" in subprocess.run(["tsp", "-l"], env=env, capture_output=True, text=True).stdout:
            time.sleep(0.005)
        elapsed = time.perf_counter() - start
        listing = subprocess.run(["tsp", "-l"], env=env, capture_output=True, text=True).stdout
        subprocess.run(["tsp", "-K"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finished = listing.count("finished")
        assert finished == jobs, "tsp finished %d of %d" % (finished, jobs)
        return elapsed

    def dispatch_parallel(self, jobs):
        folder, _, env = self.fresh("8x24g")
        jobs_file = folder / "jobs.txt"
        jobs_file.write_text("true\n" * jobs)
        env["HOME"] = str(folder)  # parallel's citation notice and state
        start = time.perf_counter()
        subprocess.run(["parallel", "--will-cite", "-j", "8"], stdin=open(jobs_file), env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start

    def dispatch_xargs(self, jobs):
        """The floor: one `true` per job and nothing else (no GPU read, no lease, no journal, no log)."""
        folder, _, env = self.fresh("8x24g")
        jobs_file = folder / "jobs.txt"
        jobs_file.write_text("true\n" * jobs)
        start = time.perf_counter()
        subprocess.run(["xargs", "-P", "8", "-n", "1", "-a", str(jobs_file)], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start

    # --- (b) placement -----------------------------------------------------------------------------
    def placement_jobs(self, count, seed=7):
        rng = random.Random(seed)
        jobs = []
        for i in range(count):
            mem = rng.randint(2, 20)
            seconds = round(rng.uniform(0.2, 2.0), 2)
            jobs.append({"name": "p%03d" % i, "mem": "%dG" % mem, "seconds": seconds})
        return jobs

    def placement(self, jobs, one_per_gpu, extra=()):
        folder, host, env = self.fresh("8x24g")
        lines = []
        for job in jobs:
            entry = {"name": job["name"], "cmd": [str(self.fake_gpu_job), "--mem", job["mem"], "--seconds", str(job["seconds"])],
                     "mem": job["mem"]}
            if one_per_gpu:
                entry["exclusive"] = True
            lines.append(json.dumps(entry))
        jobs_file = folder / "jobs.jsonl"
        jobs_file.write_text("\n".join(lines) + "\n")
        start = time.perf_counter()
        done = subprocess.run([str(self.gpuslot), "batch", str(jobs_file), *extra], env=env, cwd=folder,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        makespan = time.perf_counter() - start
        status = json.loads(subprocess.run([str(self.gpuslot), "batch", "--status", str(jobs_file) + ".gpuslot.db", "--json"],
                                           env=env, capture_output=True, text=True, check=True).stdout)["jobs"]
        failed = sum(job["state"] != "succeeded" for job in status)
        oom = sum(job["oom_failures"] for job in status)
        if done.returncode != 0 and failed == 0:
            raise SystemExit("batch failed: %s" % done.stderr[-2000:])
        total_mib = sum(gpu["memory_total_mib"] for gpu in json.loads(host.read_text())["gpus"])
        area = sum(int(job["mem"][:-1]) * 1024 * job["seconds"] for job in jobs)
        bound = max(max(job["seconds"] for job in jobs), area / total_mib)
        return makespan, bound, failed, oom

    # --- (c) memory --------------------------------------------------------------------------------
    def memory(self, count):
        folder, host, env = self.fresh("8x24g")
        jobs_file = folder / "jobs.jsonl"
        with open(jobs_file, "w") as out:
            for i in range(count):
                out.write('{"cmd": "sleep 30", "mem": "20G"}\n')
        process = subprocess.Popen([str(self.gpuslot), "batch", str(jobs_file)], env=env, cwd=folder,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        journal = str(jobs_file) + ".gpuslot.db"
        deadline = time.monotonic() + 120
        running = 0
        while time.monotonic() < deadline:
            if os.path.exists(journal):
                out = subprocess.run(["sqlite3", journal, "select count(*) from jobs where state='running'"],
                                     capture_output=True, text=True).stdout.strip()
                running = int(out or 0)
                if running >= 8:
                    break
            time.sleep(0.2)
        time.sleep(2)  # a few scheduling rounds with 8 running and the rest queued
        hwm = rss = 0
        with open("/proc/%d/status" % process.pid) as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        return running, hwm / 1024, rss / 1024


def machine():
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return "%s, %d CPUs, Linux %s, load average %s" % (model, os.cpu_count(), platform.release(),
                                                       " ".join("%.2f" % x for x in os.getloadavg()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default="build")
    parser.add_argument("--quick", action="store_true", help="fewer jobs and repetitions (smoke run)")
    parser.add_argument("--only", choices=["dispatch", "placement", "memory"])
    args = parser.parse_args()
    for tool in ("tsp", "parallel", "sqlite3"):
        if shutil.which(tool) is None:
            raise SystemExit("%s is missing: apt-get install task-spooler parallel sqlite3" % tool)
    work = tempfile.mkdtemp(prefix="gpuslot-bench-batch-")
    bench = Bench(args.build, work)
    print("machine: %s" % machine())
    reps = 1 if args.quick else 3
    try:
        if args.only in (None, "dispatch"):
            jobs = 200 if args.quick else 2000
            print("\n### (a) dispatch: %d x `true` on 8 fake GPUs, %d repetitions, interleaved\n" % (jobs, reps))
            results = {name: [] for name in ("gpuslot", "gpuslot --max-running 8", "gpuslot, state on tmpfs", "tsp -S 8",
                                             "parallel -j 8", "xargs -P 8 (the floor)")}
            for _ in range(reps):
                results["gpuslot"].append(bench.dispatch_gpuslot(jobs, ["--mem", "1G"]))
                results["gpuslot --max-running 8"].append(bench.dispatch_gpuslot(jobs, ["--mem", "1G", "--max-running", "8"]))
                results["gpuslot, state on tmpfs"].append(bench.dispatch_gpuslot(jobs, ["--mem", "1G"], state_on_tmpfs=True))
                results["tsp -S 8"].append(bench.dispatch_tsp(jobs))
                results["parallel -j 8"].append(bench.dispatch_parallel(jobs))
                results["xargs -P 8 (the floor)"].append(bench.dispatch_xargs(jobs))
            tsp = statistics.median(results["tsp -S 8"])
            floor = statistics.median(results["xargs -P 8 (the floor)"])
            print("| runner | median s | jobs/s | rate vs tsp | time vs the floor | runs (s) |")
            print("|---|---:|---:|---:|---:|---|")
            for name, times in results.items():
                median = statistics.median(times)
                print("| %s | %.2f | %.0f | %.2f× | %.2f× | %s |" % (name, median, jobs / median, tsp / median, median / floor,
                                                                    " ".join("%.2f" % t for t in times)))
            print("\nload average after: %s" % " ".join("%.2f" % x for x in os.getloadavg()))
        if args.only in (None, "placement"):
            count = 60 if args.quick else 200
            jobs = bench.placement_jobs(count)
            print("\n### (b) placement: %d fake-gpu-jobs, 2-20 GiB, 0.2-2 s, on 8 x 24 GiB\n" % count)
            print("| placement | median makespan s | lower bound s | ratio | failed | out-of-memory | runs (s) |")
            print("|---|---:|---:|---:|---:|---:|---|")
            runners = (("gpuslot batch (pack, largest first: the default)", False, ()),
                       ("gpuslot batch --order file (pack, file order)", False, ("--order", "file")),
                       ("one job per GPU (exclusive)", True, ()))
            runs = {label: [] for label, _, _ in runners}
            for _ in range(reps):
                for label, one, extra in runners:  # interleaved, so load changes hit every runner alike
                    runs[label].append(bench.placement(jobs, one, extra))
            for label, _, _ in runners:
                makespans = [run[0] for run in runs[label]]
                bound = runs[label][0][1]
                median = statistics.median(makespans)
                print("| %s | %.2f | %.2f | %.3f | %d | %d | %s |" % (
                    label, median, bound, median / bound, sum(run[2] for run in runs[label]),
                    sum(run[3] for run in runs[label]), " ".join("%.2f" % m for m in makespans)))
            print("\nload average after: %s" % " ".join("%.2f" % x for x in os.getloadavg()))
        if args.only in (None, "memory"):
            count = 10000 if args.quick else 100000
            print("\n### (c) scheduler memory with %d queued jobs\n" % count)
            running, hwm, rss = bench.memory(count)
            print("| jobs | running | peak RSS (VmHWM) MiB | RSS MiB |")
            print("|---:|---:|---:|---:|")
            print("| %d | %d | %.1f | %.1f |" % (count, running, hwm, rss))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
