#!/usr/bin/env python3
"""Event simulation of batch placement: what order and GPU choice can reach, with no process cost.

    python3 bench/simulate_placement.py [--overhead 0,0.05,0.15] [--seeds 7,1,2,3]

The jobs are bench_batch.py's placement jobs (200 of 2-20 GiB for 0.2-2 s, same seeds) on
8 x 24 GiB. Whenever room frees, queued jobs are offered it in the order under test and each is
placed on the first GPU the strategy picks among those it fits. `overhead` is added to every
job's duration (process start, NVML, lease). Prints makespan / lower bound, the figure
bench_batch.py measures on real processes (bench/README.md, "Batch").
"""
import argparse
import heapq
import random

GPUS, CAPACITY = 8, 24


def placement_jobs(seed, count=200):
    rng = random.Random(seed)  # the same draws as bench_batch.py's placement_jobs
    return [(rng.randint(2, 20), round(rng.uniform(0.2, 2.0), 2)) for _ in range(count)]


def simulate(jobs, order, pick, overhead):
    free = [CAPACITY] * GPUS
    queue = list(range(len(jobs)))
    ends = []
    now = 0.0

    def place():
        while True:
            for job in order(queue, jobs):
                fits = [gpu for gpu in range(GPUS) if free[gpu] >= jobs[job][0]]
                if fits:
                    gpu = pick(fits, free)
                    free[gpu] -= jobs[job][0]
                    queue.remove(job)
                    heapq.heappush(ends, (now + jobs[job][1] + overhead, gpu, jobs[job][0]))
                    break
            else:
                return

    place()
    while ends:
        now, gpu, mem = heapq.heappop(ends)
        free[gpu] += mem
        while ends and ends[0][0] == now:
            _, other, other_mem = heapq.heappop(ends)
            free[other] += other_mem
        place()
    return now


ORDERS = {"file": lambda queue, jobs: queue,
          "largest-first": lambda queue, jobs: sorted(queue, key=lambda job: -jobs[job][0])}
PICKS = {"pack (fullest that fits)": lambda fits, free: min(fits, key=lambda gpu: (free[gpu], gpu)),
         "most-free": lambda fits, free: max(fits, key=lambda gpu: (free[gpu], -gpu))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overhead", default="0,0.05,0.15", help="seconds added to every job, comma-separated")
    parser.add_argument("--seeds", default="7,1,2,3", help="bench_batch.py uses seed 7")
    args = parser.parse_args()
    print("| seed | order | GPU choice | overhead s | makespan s | lower bound s | ratio |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for seed in (int(x) for x in args.seeds.split(",")):
        jobs = placement_jobs(seed)
        bound = max(max(seconds for _, seconds in jobs), sum(mem * seconds for mem, seconds in jobs) / (GPUS * CAPACITY))
        for order_name, order in ORDERS.items():
            for pick_name, pick in PICKS.items():
                for overhead in (float(x) for x in args.overhead.split(",")):
                    makespan = simulate(jobs, order, pick, overhead)
                    print("| %d | %s | %s | %.2f | %.2f | %.2f | %.3f |" % (
                        seed, order_name, pick_name, overhead, makespan, bound, makespan / bound))


if __name__ == "__main__":
    main()
