#!/usr/bin/env python3
"""syscall_time.py — CPU time per launch by system call, from a sampling profile of bench_reserve
(bench/README.md, "Sitting 9").

Reads `perf script` output of a `perf record -F FREQ -g` run and prints, for each system call
that samples were taken in, the CPU time per launch: samples / FREQ / LAUNCHES. Samples outside
any system call are summed as "user code and page faults" where their stack names
Ledger::reserve (glibc's own wrappers have no frame pointers, so a system call's stack may stop
before it reaches the caller: system calls are counted over the whole benchmark).

  cmake -S . -B build-fp -G Ninja -DCMAKE_CXX_FLAGS=-fno-omit-frame-pointer && ninja -C build-fp bench_reserve
  perf record -F 4999 -g -o cpu.data -- \\
      build-fp/bin/bench_reserve --samples 2048 --mode reserve --concurrency 64
  perf script -i cpu.data > cpu.txt
  bench/syscall_time.py cpu.txt --frequency 4999 --launches 2048
"""
import argparse
import collections
import re

SYSCALL = re.compile(r"\s(__x64_sys_\w+|__do_sys_\w+)\+")


def samples(text):
    """Each sample's stack frames (innermost first)."""
    for event in text.split("\n\n"):
        lines = event.strip().split("\n")
        if len(lines) > 1:
            yield lines[1:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("perf_script", help="output of `perf script`")
    parser.add_argument("--frequency", type=float, required=True, help="perf record -F")
    parser.add_argument("--launches", type=int, required=True, help="bench_reserve --samples")
    parser.add_argument("--top", type=int, default=18)
    args = parser.parse_args()
    with open(args.perf_script, errors="replace") as file:
        text = file.read()
    counts = collections.Counter()
    for frames in samples(text):
        call = next((match.group(1) for frame in frames if (match := SYSCALL.search(frame))), None)
        if call is not None:
            counts[call] += 1
        elif any("Ledger::reserve" in frame for frame in frames):
            counts["user code and page faults in Ledger::reserve"] += 1
    scale = 1e6 / args.frequency / args.launches
    print("| µs per launch | samples | where |\n|---:|---:|---|")
    for where, count in counts.most_common(args.top):
        print("| %.1f | %d | %s |" % (count * scale, count, where))


if __name__ == "__main__":
    main()
