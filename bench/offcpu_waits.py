#!/usr/bin/env python3
"""offcpu_waits.py — how long launches slept on the state directory's inode lock (bench/README.md,
"Sitting 7").

Reads `perf script` output of a `perf record -e sched:sched_switch -g` run of bench_reserve and
prints, for the two kinds of sleep that matter, how many there were and how long they lasted
(from a process switching out to its next switch-in):
  write: the host lock's holder in rename (rwsem_down_write_slowpath under reserve_locked);
  read:  a launch listing the directory (rwsem_down_read_slowpath).

  perf record -e sched:sched_switch -g -o sw.data \\
      build/bin/bench_reserve --samples 512 --mode reserve --concurrency 64
  perf script -i sw.data > sw.txt
  bench/offcpu_waits.py sw.txt

Call stacks name reserve_locked only in a build with frame pointers
(-DCMAKE_CXX_FLAGS=-fno-omit-frame-pointer).
"""
import re
import sys

SWITCH = re.compile(r"\s(\d+\.\d+):\s+sched:sched_switch: prev_comm=\S+ prev_pid=(\d+) "
                    r"prev_prio=\d+ prev_state=\S+ ==> next_comm=\S+ next_pid=(\d+)")


def waits(text):
    asleep = {}  # pid -> (switched out at, kind)
    found = {"write": [], "read": []}
    for event in text.split("\n\n"):
        lines = event.strip().split("\n")
        match = SWITCH.search(lines[0]) if lines else None
        if not match:
            continue
        at, prev, following = float(match.group(1)), int(match.group(2)), int(match.group(3))
        if following in asleep:
            since, kind = asleep.pop(following)
            found[kind].append((at - since) * 1e6)
        top = " ".join(lines[1:8])  # the innermost frames: what it sleeps in
        if "rwsem_down_write_slowpath" in top and "reserve_locked" in event:
            asleep[prev] = (at, "write")
        elif "rwsem_down_read_slowpath" in top:
            asleep[prev] = (at, "read")
    return found


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: offcpu_waits.py PERF_SCRIPT_OUTPUT")
    with open(sys.argv[1], encoding="utf-8", errors="replace") as file:
        found = waits(file.read())
    for kind, durations in found.items():
        durations.sort()
        if not durations:
            print(f"{kind}: none")
            continue
        median = durations[len(durations) // 2]
        print(f"{kind}: {len(durations)} waits, median {median:.0f} us, "
              f"max {durations[-1]:.0f} us, {sum(durations) / 1000:.1f} ms in all")


if __name__ == "__main__":
    main()
