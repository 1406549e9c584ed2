#!/usr/bin/env python3
"""Whole-process latency of `gpuslot pick` and `gpuslot status --json` on the fake NVML.

What it measures: wall time from spawning the process to its exit (fork/exec, dynamic loading,
dlopen of the NVML library, one NVML pass, the lease directory, printing), as a shell script or a
service start-up pays it. Each command runs --runs times (default 300) after --warmup runs; the
report gives median, p90 and p99 in milliseconds, and the same figures for /bin/true started the
same way and interleaved with them (round-robin), which is the floor this harness and the kernel
put under any process.

NVML passes: with gdb installed, one extra run per command is made under gdb with a breakpoint
that never stops (`ignore`) on every NVML entry point gpuslot may bind
(src/nvml/nvml_entry_points.def); a pass starts with nvmlDeviceGetCount*, so the count of those
calls is the number of passes. Without gdb the column says "n/a".

Usage (Debian python3, no extra packages; build first):
    python3 bench/bench_cli_latency.py [--build-dir build] [--runs 300] [--markdown]
"""
import argparse
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

SOURCE_DIR = Path(__file__).resolve().parents[1]
HOSTS = {"8x4090": SOURCE_DIR / "examples" / "hosts" / "8x4090.json",
         "64x80g": SOURCE_DIR / "tests" / "hosts" / "64x80g.json"}
COMMANDS = [["pick"], ["status", "--json"]]
TARGET_MS = 5.0  # the target: a pick on 8 GPUs, process start included


def environment(build_dir, host_file, state_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUSLOT_", "CUDA_", "NVIDIA_"))}
    env.update(GPUSLOT_NVML_LIBRARY=str(build_dir / "libexec" / "gpuslot" / "libnvidia-ml.so.1"),
               GPUSLOT_FAKE_NVML_HOST=str(host_file), GPUSLOT_STATE_DIR=str(state_dir), NO_COLOR="1")
    return env


def time_interleaved(jobs, runs, warmup):
    """{key: [wall-clock ms]} for `runs` complete runs of each (key, argv, env) job, after `warmup`
    untimed ones. Round-robin, so a burst of load from elsewhere hits every command alike."""
    def once(argv, env):
        start = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        return (time.perf_counter() - start) * 1000.0

    for _ in range(warmup):
        for _, argv, env in jobs:
            once(argv, env)
    samples = {key: [] for key, _, _ in jobs}
    for _ in range(runs):
        for key, argv, env in jobs:
            samples[key].append(once(argv, env))
    return samples


def summary(samples):
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {"median": statistics.median(samples), "p90": cuts[89], "p99": cuts[98], "min": min(samples)}


def nvml_symbols():
    text = (SOURCE_DIR / "src" / "nvml" / "nvml_entry_points.def").read_text()
    return sorted(set(re.findall(r"GPUSLOT_NVML_SYMBOL\(\s*\w+\s*,\s*(nvml\w+)\s*\)", text)))


def count_nvml_calls(argv, env, workdir):
    """{symbol: calls} for one run under gdb, or None when gdb is missing or cannot trace."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return None
    symbols = nvml_symbols()
    script = Path(workdir) / "count.gdb"
    lines = ["set breakpoint pending on", "set pagination off", "set confirm off"]
    lines += ["break %s" % s for s in symbols]
    lines += ["ignore %d 100000000" % n for n in range(1, len(symbols) + 1)]
    lines += ["run", "info breakpoints"]
    script.write_text("\n".join(lines) + "\n")
    result = subprocess.run([gdb, "-q", "-batch", "-nx", "-x", str(script), "--args", *argv], env=env,
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    if not re.search(r"exited (normally|with code)", output):
        return None
    counts, current = {s: 0 for s in symbols}, None
    for line in output.splitlines():
        header = re.match(r"^(\d+)\s+breakpoint\s", line)
        if header:
            current = symbols[int(header.group(1)) - 1]
            continue
        hits = re.match(r"^\s+breakpoint already hit (\d+) times?", line)
        if hits and current is not None:
            counts[current] += int(hits.group(1))
    return counts


def machine():
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return "%s, %d CPUs (os.cpu_count), %s %s, Python %s" % (cpu, os.cpu_count() or 0, platform.system(),
                                                           platform.release(), platform.python_version())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", default=str(SOURCE_DIR / "build"), help="build tree (default: build)")
    parser.add_argument("--runs", type=int, default=300, help="timed runs per command (default 300)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed runs first (default 20)")
    parser.add_argument("--no-count", action="store_true", help="skip the NVML call count under gdb")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table for bench/README.md")
    args = parser.parse_args()

    build_dir = Path(args.build_dir).resolve()
    gpuslot = build_dir / "bin" / "gpuslot"
    for needed in (gpuslot, build_dir / "libexec" / "gpuslot" / "libnvidia-ml.so.1"):
        if not needed.exists():
            sys.exit("bench: %s is missing; build first (ninja -C %s)" % (needed, build_dir))
    true = shutil.which("true") or "/bin/true"
    load_before = os.getloadavg()

    rows = []
    with tempfile.TemporaryDirectory(prefix="gpuslot-bench-") as workdir:
        jobs = [("floor", [true], dict(os.environ))]
        for host_name, host_source in HOSTS.items():
            host_file = Path(workdir) / host_source.name  # a private copy: the fake may keep files beside it
            shutil.copyfile(host_source, host_file)
            env = environment(build_dir, host_file, Path(workdir) / "state")
            for command in COMMANDS:
                argv = [str(gpuslot), *command]
                check = subprocess.run(argv, env=env, capture_output=True, text=True)
                if check.returncode != 0:
                    sys.exit("bench: %s failed (%d): %s" % (" ".join(command), check.returncode, check.stderr))
                jobs.append(((host_name, " ".join(command)), argv, env))
        samples = time_interleaved(jobs, args.runs, args.warmup)
        floor = summary(samples["floor"])
        for key, argv, env in jobs[1:]:
            counts = None if args.no_count else count_nvml_calls(argv, env, workdir)
            passes = calls = None
            if counts is not None:
                passes = counts.get("nvmlDeviceGetCount_v2", 0) + counts.get("nvmlDeviceGetCount", 0)
                calls = sum(counts.values())
            rows.append((key[0], key[1], summary(samples[key]), passes, calls))

    print("machine: %s" % machine())
    print("runs: %d timed (+%d warm-up) per command; build: %s" % (args.runs, args.warmup, build_dir))
    print("floor (/bin/true, same harness, interleaved): median %.2f ms, p90 %.2f ms, p99 %.2f ms"
          % (floor["median"], floor["p90"], floor["p99"]))
    print("load average (1/5/15 min) before: %.2f %.2f %.2f, after: %.2f %.2f %.2f" % (load_before + os.getloadavg()))
    if args.markdown:
        print()
        print("| host | command | median ms | p90 ms | p99 ms | min ms | median over floor ms | median / 5 ms target "
              "| NVML passes | NVML calls |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for host_name, command, stats, passes, calls in rows:
        shown_passes = "n/a" if passes is None else str(passes)
        shown_calls = "n/a" if calls is None else str(calls)
        if args.markdown:
            print("| %s | `gpuslot %s` | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %s | %s |"
                  % (host_name, command, stats["median"], stats["p90"], stats["p99"], stats["min"],
                     stats["median"] - floor["median"], stats["median"] / TARGET_MS, shown_passes, shown_calls))
        else:
            print("%-7s gpuslot %-14s median %6.2f ms  p90 %6.2f ms  p99 %6.2f ms  (%.2fx the 5 ms target)  "
                  "NVML passes %s, calls %s" % (host_name, command, stats["median"], stats["p90"], stats["p99"],
                                                stats["median"] / TARGET_MS, shown_passes, shown_calls))
    pick_8 = next(stats for host_name, command, stats, _, _ in rows if host_name == "8x4090" and command == "pick")
    verdict = "meets" if pick_8["median"] < TARGET_MS else "MISSES"
    print("pick on 8 GPUs: median %.2f ms %s the %.0f ms target" % (pick_8["median"], verdict, TARGET_MS))
    over = [(h, c, p) for h, c, _, p, _ in rows if p is not None and p > 1]
    if over:
        print("more than one NVML pass: %s" % ", ".join("%s on %s: %d" % (c, h, p) for h, c, p in over))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
