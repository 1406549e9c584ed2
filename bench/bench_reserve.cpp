// bench_reserve — latency of the select-and-reserve step itself, in-process, with 1, 16 and 64
// launches at the same instant (bench/README.md, "Leases and run").
//
// Why a C++ program and not bench_leases.py: a whole `gpuslot run` process on a 2-core machine
// spends most of its time starting (exec, dynamic loading, the dlopen of NVML), and 64 of them
// queue for the CPU however short the host lock is. What the target is about is the step that
// launches serialise on: snapshot, lease scan, host lock, decision, lease write. Here every
// worker is a process of its own (as launches are), has loaded NVML through the real loader
// before the start signal, and times only Ledger::reserve.
//
//   bench_reserve [--concurrency 1,16,64] [--samples 512] [--host HOST.json] [--nvml LIB]
//                 [--mode reserve|split|both] [--work DIR (default /tmp; /dev/shm for tmpfs)]
//                 [--warmup ROUNDS (default 1, unmeasured, per N)]
//
// One round = N workers forked, each loads NVML, then all block on a pipe the parent closes (the
// barrier), call Ledger::reserve for 1 MiB (CLOCK_MONOTONIC around it), report the time through
// a pipe and keep their lease until every worker of the round has reported — so the last one
// decides against N − 1 live leases, the worst case. Rounds repeat until there are `samples`
// samples per N. Mode `split` runs the same steps as Ledger::reserve one by one (the pieces are
// in lease/internal.hpp) to time the wait for the host lock and how long it is held, without
// timing code in the product.
#include <fcntl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "gpuslot/inventory.hpp"
#include "gpuslot/lease.hpp"
#include "gpuslot/nvml.hpp"
#include "gpuslot/units.hpp"
#include "gpuslot/visibility.hpp"
#ifndef BENCH_RESERVE_PUBLIC_ONLY
#include "lease/internal.hpp"
#endif

namespace {

using namespace gpuslot;

struct Sample {
  std::int64_t total_ns = -1;  // the whole reserve step; -1: failed
  std::int64_t wait_ns = -1;   // split mode: lock requested -> acquired
  std::int64_t hold_ns = -1;   // split mode: lock acquired -> released (lease published)
  // CPU time of this process (CLOCK_PROCESS_CPUTIME_ID): the whole step, and in split mode its
  // parts — what 64 launches on 2 cores must share, however short the lock.
  std::int64_t cpu_ns = -1;
  std::int64_t cpu_snapshot_ns = -1, cpu_scan_ns = -1, cpu_locked_ns = -1;
};

std::int64_t clock_ns(clockid_t clock) {
  timespec now{};
  ::clock_gettime(clock, &now);
  return std::int64_t(now.tv_sec) * 1000000000 + now.tv_nsec;
}
std::int64_t now_ns() { return clock_ns(CLOCK_MONOTONIC); }
std::int64_t cpu_now_ns() { return clock_ns(CLOCK_PROCESS_CPUTIME_ID); }  // this (single-threaded) worker

bool write_all(int fd, const void* data, std::size_t size) {
  const char* bytes = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, bytes, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    bytes += n;
    size -= std::size_t(n);
  }
  return true;
}

bool read_all(int fd, void* data, std::size_t size) {
  char* bytes = static_cast<char*>(data);
  while (size > 0) {
    const ssize_t n = ::read(fd, bytes, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    bytes += n;
    size -= std::size_t(n);
  }
  return true;
}

void wait_for_eof(int fd) {
  char byte;
  for (;;) {
    const ssize_t n = ::read(fd, &byte, 1);
    if (n == 0 || (n < 0 && errno != EINTR)) return;
  }
}

struct Pipes {
  int ready[2], start[2], results[2], finish[2];
};

// One worker: load NVML, say ready, wait for the start, reserve, report, hold until told.
[[noreturn]] void worker(const Pipes& pipes, const std::string& state_dir, bool split) {
  ::close(pipes.ready[0]);
  ::close(pipes.start[1]);
  ::close(pipes.results[0]);
  ::close(pipes.finish[1]);
  Sample sample;
  auto nvml = NvmlLibrary::open();
  if (!nvml) {
    std::fprintf(stderr, "bench_reserve: %s\n", nvml.error().message.c_str());
    ::_exit(3);
  }
  const VisibilityEnv env = visibility_env_from_process();
  SnapshotSource snapshot_source = [&] { return take_snapshot(**nvml); };
  VisibilityOf visibility_of = [&](const Snapshot& snapshot) { return resolve_visibility(snapshot, env); };
  Ledger ledger(state_dir);
  ReserveRequest request;
  request.requirements.memory_bytes = 1 * kMiB;
  request.command = "bench_reserve";
  std::vector<std::string> warnings;

  const char ready = 'r';
  write_all(pipes.ready[1], &ready, 1);
  ::close(pipes.ready[1]);  // so that a worker that died before this cannot hang the parent
  wait_for_eof(pipes.start[0]);

  std::unique_ptr<HeldLease> lease;
  const std::int64_t start = now_ns();
  const std::int64_t cpu_start = cpu_now_ns();
  if (!split) {
    auto reserved = ledger.reserve(request, snapshot_source, visibility_of, &warnings);
    const std::int64_t end = now_ns();
    if (reserved && reserved->lease) {
      sample.total_ns = end - start;
      sample.cpu_ns = cpu_now_ns() - cpu_start;
      lease = std::move(reserved->lease);
    }
  } else {
#ifndef BENCH_RESERVE_PUBLIC_ONLY
    // Exactly the steps of Ledger::reserve (ledger.cpp), with clocks between them.
    using namespace lease_internal;
    auto snapshot = snapshot_source();
    const std::int64_t cpu_snapshot = cpu_now_ns();
    if (snapshot) {
      const LeaseRecord identity = holder_identity(request);
      std::int64_t requested = 0, acquired = 0, released = 0, cpu_scanned = 0, cpu_acquired = 0, cpu_released = 0;
      {
        LedgerView view = view_before_lock(state_dir, *snapshot, &warnings);
        cpu_scanned = cpu_now_ns();
        requested = now_ns();
        {
          auto lock = HostLock::acquire(state_dir);
          acquired = now_ns();
          cpu_acquired = cpu_now_ns();
          if (lock) {
            auto reserved = reserve_locked(ledger, request, identity, std::move(*snapshot), visibility_of, true, view, &warnings);
            if (reserved && reserved->lease) lease = std::move(reserved->lease);
          }
        }
        released = now_ns();
        cpu_released = cpu_now_ns();
      }  // the view's open lease files are closed here, after the lock, as in Ledger::reserve
      const std::int64_t end = now_ns();
      if (lease) {
        sample.total_ns = end - start;
        sample.cpu_ns = cpu_now_ns() - cpu_start;
        sample.cpu_snapshot_ns = cpu_snapshot - cpu_start;
        sample.cpu_scan_ns = cpu_scanned - cpu_snapshot;
        sample.cpu_locked_ns = cpu_released - cpu_acquired;
        sample.wait_ns = acquired - requested;
        sample.hold_ns = released - acquired;
      }
    }
#endif
  }
  write_all(pipes.results[1], &sample, sizeof sample);
  ::close(pipes.results[1]);
  wait_for_eof(pipes.finish[0]);
  if (lease) lease->release();
  ::_exit(sample.total_ns >= 0 ? 0 : 1);
}

// One round of `count` workers; appends their samples. False if a worker failed.
bool run_round(int count, const std::string& state_dir, bool split, std::vector<Sample>& samples) {
  Pipes pipes{};
  if (::pipe2(pipes.ready, O_CLOEXEC) != 0 || ::pipe2(pipes.start, O_CLOEXEC) != 0 ||
      ::pipe2(pipes.results, O_CLOEXEC) != 0 || ::pipe2(pipes.finish, O_CLOEXEC) != 0) {
    std::perror("bench_reserve: pipe");
    return false;
  }
  std::vector<pid_t> children;
  for (int i = 0; i < count; ++i) {
    const pid_t pid = ::fork();
    if (pid == 0) worker(pipes, state_dir, split);
    if (pid < 0) {
      std::perror("bench_reserve: fork");
      return false;
    }
    children.push_back(pid);
  }
  ::close(pipes.ready[1]);
  ::close(pipes.start[0]);
  ::close(pipes.results[1]);
  ::close(pipes.finish[0]);
  bool ok = true;
  for (int i = 0; i < count; ++i) {
    char byte;
    if (!read_all(pipes.ready[0], &byte, 1)) ok = false;
  }
  ::close(pipes.start[1]);  // the barrier: every worker wakes on end-of-file
  for (int i = 0; i < count && ok; ++i) {
    Sample sample;
    if (!read_all(pipes.results[0], &sample, sizeof sample) || sample.total_ns < 0) ok = false;
    else samples.push_back(sample);
  }
  ::close(pipes.finish[1]);  // every lease was held until all had reported
  for (pid_t child : children) {
    int status = 0;
    ::waitpid(child, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) ok = false;
  }
  ::close(pipes.ready[0]);
  ::close(pipes.results[0]);
  return ok;
}

// Nearest rank, as bench_leases.py computes it.
double percentile_ms(std::vector<std::int64_t> values, double fraction) {
  if (values.empty()) return NAN;
  std::sort(values.begin(), values.end());
  const auto n = double(values.size());
  const long rank = std::clamp(long(std::lround(fraction * n + 0.5)) - 1, 0L, long(values.size()) - 1);
  return double(values[std::size_t(rank)]) / 1e6;
}

double median_ms(std::vector<std::int64_t> values) {
  if (values.empty()) return NAN;
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return (n % 2 == 1 ? double(values[n / 2]) : (double(values[n / 2 - 1]) + double(values[n / 2])) / 2) / 1e6;
}

std::string summary(const std::vector<Sample>& samples, std::int64_t Sample::*field) {
  std::vector<std::int64_t> values;
  for (const auto& sample : samples) values.push_back(sample.*field);
  char text[64];
  std::snprintf(text, sizeof text, "%.2f / %.2f", median_ms(values), percentile_ms(values, 0.99));
  return text;
}

std::string load_average() {
  double loads[3] = {};
  if (::getloadavg(loads, 3) != 3) return "?";
  char text[64];
  std::snprintf(text, sizeof text, "%.2f %.2f %.2f", loads[0], loads[1], loads[2]);
  return text;
}

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "bench_reserve: %s\nusage: bench_reserve [--concurrency 1,16,64] [--samples 512] [--host HOST.json] "
               "[--nvml LIBRARY] [--mode reserve|split|both] [--work DIR] [--warmup ROUNDS]\n",
               why);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> concurrency{1, 16, 64};
  int samples_wanted = 512;
  int warmup_rounds = 1;
  std::string host = BENCH_RESERVE_DEFAULT_HOST;
  std::string nvml = BENCH_RESERVE_DEFAULT_NVML;
  std::string mode = "both";
  std::string work_root = "/tmp";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) usage(("missing value after " + arg).c_str());
    const std::string value = argv[++i];
    if (arg == "--concurrency") {
      concurrency.clear();
      for (std::size_t at = 0; at <= value.size();) {
        const std::size_t comma = std::min(value.find(',', at), value.size());
        const int n = std::atoi(value.substr(at, comma - at).c_str());
        if (n <= 0) usage("--concurrency takes positive numbers, e.g. 1,16,64");
        concurrency.push_back(n);
        at = comma + 1;
      }
    } else if (arg == "--samples") {
      samples_wanted = std::atoi(value.c_str());
      if (samples_wanted <= 0) usage("--samples takes a positive number");
    } else if (arg == "--warmup") {
      warmup_rounds = std::atoi(value.c_str());
      if (warmup_rounds < 0 || (warmup_rounds == 0 && value != "0")) usage("--warmup takes a number of rounds, 0 or more");
    } else if (arg == "--host") {
      host = value;
    } else if (arg == "--nvml") {
      nvml = value;
    } else if (arg == "--work") {
      work_root = value;  // where the state directory lives: /tmp (disk here), /dev/shm (tmpfs, as /run on systemd hosts)
    } else if (arg == "--mode") {
      mode = value;
      if (mode != "reserve" && mode != "split" && mode != "both") usage("--mode takes reserve, split or both");
    } else {
      usage(("unknown option " + arg).c_str());
    }
  }
#ifdef BENCH_RESERVE_PUBLIC_ONLY
  if (mode != "reserve") usage("built with BENCH_RESERVE_PUBLIC_ONLY: only --mode reserve");
#endif

  // A private copy of the host (the fake records allocations beside it) and private leases.
  std::string work_template_text = work_root + "/gpuslot-bench-reserve-XXXXXX";
  std::vector<char> work_template(work_template_text.begin(), work_template_text.end());
  work_template.push_back('\0');
  if (::mkdtemp(work_template.data()) == nullptr) {
    std::perror("bench_reserve: mkdtemp");
    return 1;
  }
  const std::filesystem::path work = work_template.data();
  std::error_code error;
  std::filesystem::copy_file(host, work / "host.json", error);
  if (error) {
    std::fprintf(stderr, "bench_reserve: cannot copy host file %s: %s\n", host.c_str(), error.message().c_str());
    return 2;
  }
  ::setenv("GPUSLOT_NVML_LIBRARY", nvml.c_str(), 1);
  ::setenv("GPUSLOT_FAKE_NVML_HOST", (work / "host.json").c_str(), 1);
  ::unsetenv("CUDA_VISIBLE_DEVICES");
  ::unsetenv("CUDA_DEVICE_ORDER");

  std::printf("bench_reserve: host %s, %d+ samples per N after %d unmeasured round(s), load average at start %s\n\n",
              host.c_str(), samples_wanted, warmup_rounds, load_average().c_str());
  std::printf("| mode | concurrent | rounds | samples | reserve step ms, median / p99 | lock wait ms | lock held ms "
              "| CPU ms, median: step (snapshot + scan + locked) |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|\n");
  std::fflush(stdout);
  int status = 0;
  for (const bool split : {false, true}) {
    if ((split && mode == "reserve") || (!split && mode == "split")) continue;
    for (const int n : concurrency) {
      auto state = open_state_directory((work / ("state-" + std::to_string(n) + (split ? "-split" : ""))).string());
      if (!state) {
        std::fprintf(stderr, "bench_reserve: %s\n", state.error().message.c_str());
        return 1;
      }
      std::vector<Sample> samples;
      // Unmeasured first rounds: the leases they release are the spares later launches reuse, as
      // on any host where launches ran before (the state directory outlives them). Without them
      // the first round makes every lease's inode anew, which on ext4 without a journal costs
      // 0.3+ ms a file (see bench/README.md).
      for (int round = 0; round < warmup_rounds; ++round) {
        std::vector<Sample> discarded;
        if (!run_round(n, *state, split, discarded)) {
          std::fprintf(stderr, "bench_reserve: a worker failed in a warm-up round of N = %d\n", n);
          return 1;
        }
      }
      int rounds = 0;
      while (int(samples.size()) < samples_wanted) {
        ++rounds;
        if (!run_round(n, *state, split, samples)) {
          std::fprintf(stderr, "bench_reserve: a worker failed in round %d of N = %d\n", rounds, n);
          status = 1;
          break;
        }
      }
      auto cpu_median = [&samples](std::int64_t Sample::*field) {
        std::vector<std::int64_t> values;
        for (const auto& sample : samples) values.push_back(sample.*field);
        return median_ms(values);
      };
      char cpu[96];
      if (split) {
        std::snprintf(cpu, sizeof cpu, "%.3f (%.3f + %.3f + %.3f)", cpu_median(&Sample::cpu_ns), cpu_median(&Sample::cpu_snapshot_ns),
                      cpu_median(&Sample::cpu_scan_ns), cpu_median(&Sample::cpu_locked_ns));
      } else {
        std::snprintf(cpu, sizeof cpu, "%.3f", cpu_median(&Sample::cpu_ns));
      }
      std::printf("| %s | %d | %d | %zu | %s | %s | %s | %s |\n", split ? "split" : "`Ledger::reserve`", n, rounds, samples.size(),
                  summary(samples, &Sample::total_ns).c_str(), split ? summary(samples, &Sample::wait_ns).c_str() : "",
                  split ? summary(samples, &Sample::hold_ns).c_str() : "", cpu);
      std::fflush(stdout);
    }
  }
  std::printf("\nload average at end %s\n", load_average().c_str());
  std::filesystem::remove_all(work, error);
  return status;
}
