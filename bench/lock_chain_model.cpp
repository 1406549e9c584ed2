// lock_chain_model — what 64 launches on 2 cores would take if the reserve step were nothing but
// CPU work and one flock: the floor the real step (bench_reserve) is measured against in
// bench/README.md ("Sitting 8").
//
// One round = N processes forked; each waits on a pipe the parent closes (the barrier), then
// burns BEFORE µs of its own CPU time (the snapshot and the look before the host lock), takes an
// flock on one file, burns HELD µs (the locked step), unlocks and exits. No file system, no
// NVML, no lease: any tail beyond this model's is the real step's own. A launch's latency is
// timed as bench_reserve times it: from the moment the process first runs after the barrier
// until it has unlocked. The last two columns are the least a round could take: the CPU bound,
// N × (BEFORE + HELD) / CPUs, and the lock chain, N × HELD.
//
//   lock_chain_model [--processes 64] [--before 240] [--held 120] [--rounds 40]
//                    [--slice-hint none|waiting|holding] [--lock-file PATH]
//
// --slice-hint asks the kernel (sched_setattr, sched_runtime: the EEVDF slice of a normal task,
// Linux 6.12 and later, no privilege needed) for a 0.1 ms slice while a process waits for the
// lock ("waiting": so that it runs as soon as the lock is handed to it), or for a 100 ms slice
// while it holds it ("holding": so that it is not preempted there); the default slice is asked
// back after the unlock.
#include <sched.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

std::int64_t clock_ns(clockid_t clock) {
  timespec now{};
  ::clock_gettime(clock, &now);
  return std::int64_t(now.tv_sec) * 1000000000 + now.tv_nsec;
}

void burn_cpu_us(std::int64_t microseconds) {
  const std::int64_t until = clock_ns(CLOCK_THREAD_CPUTIME_ID) + microseconds * 1000;
  while (clock_ns(CLOCK_THREAD_CPUTIME_ID) < until) {
  }
}

// The first fields of struct sched_attr (SCHED_ATTR_SIZE_VER0), declared here: glibc 2.36 has no
// wrapper for sched_setattr.
struct SchedAttr {
  std::uint32_t size, policy;
  std::uint64_t flags;
  std::int32_t nice;
  std::uint32_t priority;
  std::uint64_t runtime, deadline, period;
};

// Asks for a slice of `ns` (0: the default) for this normal-policy process, keeping its nice.
void ask_slice(std::uint64_t ns) {
  SchedAttr attr{};
  attr.size = sizeof attr;
  attr.policy = SCHED_OTHER;
  attr.nice = ::getpriority(PRIO_PROCESS, 0);
  attr.runtime = ns;
  ::syscall(SYS_sched_setattr, 0, &attr, 0);
}

struct Shared {  // one per process, in memory shared with the parent
  std::int64_t latency_ns;
  std::int64_t held_ns;
  std::int64_t finished_ns;
};

std::int64_t percentile(std::vector<std::int64_t> values, double p) {
  std::sort(values.begin(), values.end());
  const std::size_t at = std::min(values.size() - 1, std::size_t(p * double(values.size())));
  return values[at];
}

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "lock_chain_model: %s\nusage: lock_chain_model [--processes N] [--before US] [--held US] [--rounds R] "
               "[--slice-hint none|waiting|holding] [--lock-file PATH]\n",
               why);
  std::exit(2);
}

long number_of(const char* text, const char* what) {
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || value < 0 || value > 100000000) usage((std::string(what) + " takes a whole number").c_str());
  return value;
}

}  // namespace

int main(int argc, char** argv) {
  long processes = 64, before_us = 240, held_us = 120, rounds = 40;
  std::string hint = "none", lock_file = "/tmp/lock_chain_model.lock";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) usage(("missing value after " + arg).c_str());
    const char* value = argv[++i];
    if (arg == "--processes") processes = number_of(value, "--processes");
    else if (arg == "--before") before_us = number_of(value, "--before");
    else if (arg == "--held") held_us = number_of(value, "--held");
    else if (arg == "--rounds") rounds = number_of(value, "--rounds");
    else if (arg == "--slice-hint") hint = value;
    else if (arg == "--lock-file") lock_file = value;
    else usage(("unknown option " + arg).c_str());
  }
  if (hint != "none" && hint != "waiting" && hint != "holding") usage("--slice-hint takes none, waiting or holding");
  if (processes < 1 || processes > 1024 || rounds < 1) usage("--processes takes 1 to 1024, --rounds 1 or more");

  auto* shared = static_cast<Shared*>(::mmap(nullptr, sizeof(Shared) * std::size_t(processes), PROT_READ | PROT_WRITE,
                                             MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  if (shared == MAP_FAILED) usage("cannot map shared memory");
  std::vector<std::int64_t> latencies, makespans, longest_holds;
  for (long round = 0; round < rounds; ++round) {
    int barrier[2];
    if (::pipe(barrier) != 0) usage("cannot make a pipe");
    for (long p = 0; p < processes; ++p) {
      const pid_t pid = ::fork();
      if (pid < 0) usage("cannot fork");
      if (pid > 0) continue;
      ::close(barrier[1]);
      const int fd = ::open(lock_file.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
      char byte;
      while (::read(barrier[0], &byte, 1) > 0) {
      }
      const std::int64_t began = clock_ns(CLOCK_MONOTONIC);
      burn_cpu_us(before_us);
      if (hint == "waiting") ask_slice(100000);
      ::flock(fd, LOCK_EX);
      if (hint == "holding") ask_slice(100000000);
      const std::int64_t acquired = clock_ns(CLOCK_MONOTONIC);
      burn_cpu_us(held_us);
      const std::int64_t releasing = clock_ns(CLOCK_MONOTONIC);
      ::flock(fd, LOCK_UN);
      if (hint != "none") ask_slice(0);
      const std::int64_t done = clock_ns(CLOCK_MONOTONIC);
      shared[p] = Shared{done - began, releasing - acquired, done};
      ::_exit(0);
    }
    ::close(barrier[0]);
    ::usleep(100000);  // every process at the barrier
    const std::int64_t start = clock_ns(CLOCK_MONOTONIC);
    ::close(barrier[1]);
    while (::wait(nullptr) > 0) {
    }
    std::int64_t makespan = 0, longest_hold = 0;
    for (long p = 0; p < processes; ++p) {
      latencies.push_back(shared[p].latency_ns);
      makespan = std::max(makespan, shared[p].finished_ns - start);
      longest_hold = std::max(longest_hold, shared[p].held_ns);
    }
    makespans.push_back(makespan);
    longest_holds.push_back(longest_hold);
  }
  const double ms = 1e6;
  const long cpus = std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN));
  std::printf("| processes | before µs | held µs | slice hint | rounds | makespan ms, median / max | longest hold ms, "
              "median | latency ms, median / p99 | CPU bound ms | lock chain ms |\n|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|\n");
  std::printf("| %ld | %ld | %ld | %s | %ld | %.1f / %.1f | %.2f | %.1f / %.1f | %.1f | %.1f |\n", processes, before_us,
              held_us, hint.c_str(), rounds, double(percentile(makespans, 0.5)) / ms,
              double(*std::max_element(makespans.begin(), makespans.end())) / ms, double(percentile(longest_holds, 0.5)) / ms,
              double(percentile(latencies, 0.5)) / ms, double(percentile(latencies, 0.99)) / ms,
              double(processes * (before_us + held_us)) / 1e3 / double(cpus), double(processes * held_us) / 1e3);
  return 0;
}
