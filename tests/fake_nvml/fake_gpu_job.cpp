// fake-gpu-job — a stand-in for a GPU program, for end-to-end tests without a GPU.
//
//   fake-gpu-job --mem SIZE [--seconds S] [--exit CODE] [--touch FILE]
//
// It behaves as a PyTorch job does from the outside, which is all gpuslot can see: it lands on
// its process's cuda:0 (CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER), takes SIZE of that GPU's memory
// or dies with PyTorch's out-of-memory message and exit status 1, holds the memory for S seconds
// (it shows in the fake NVML's memory and process list), and gives it back when it ends. The
// check-and-record happens under the allocations lock (allocations.h), so two jobs can never both
// take the last room on a GPU, which is exactly the race gpuslot exists to prevent upstream.
//
//   SIZE   512M, 8G, 10GiB, 0.5G, 100K, 1T, 123B; binary units; a bare number is MiB
//   S      seconds, fractions allowed (default 1)
//   CODE   exit status after a successful run (default 0)
//   FILE   a line "<pid> <gpu uuid>" is appended after a successful run (exactly-once tests)
//
// SIGTERM/SIGINT give the memory back and then end the process by that signal, so a parent that
// forwards signals sees the same status as with a real job. A SIGKILLed job's memory vanishes
// because readers drop allocations of dead processes.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "allocations.h"
#include "cuda_device_order.h"
#include "host_file.h"

namespace {

using namespace fake_nvml;

constexpr int kUsageExit = 2;

struct Options {
  std::uint64_t bytes = 0;
  double seconds = 1.0;
  int exit_code = 0;
  std::string touch_file;
};

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr,
               "fake-gpu-job: %s\nusage: fake-gpu-job --mem SIZE [--seconds S] [--exit CODE] [--touch FILE]\n",
               message.c_str());
  std::exit(kUsageExit);
}

// The same accepted forms as gpuslot's size parser (DESIGN.md "Sizes"), written again here
// because the fake must not link gpuslot: a shared bug would hide itself.
std::optional<std::uint64_t> parse_size(const std::string& text) {
  std::size_t i = 0;
  bool digits = false;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i, digits = true;
  if (i < text.size() && text[i] == '.') {
    ++i;
    while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i, digits = true;
  }
  if (!digits) return std::nullopt;
  const double number = std::strtod(text.substr(0, i).c_str(), nullptr);
  std::string unit;
  for (char c : text.substr(i)) unit += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  double multiplier = 0;
  if (unit.empty() || unit == "m" || unit == "mb" || unit == "mib") multiplier = 1024.0 * 1024;
  else if (unit == "b") multiplier = 1;
  else if (unit == "k" || unit == "kb" || unit == "kib") multiplier = 1024;
  else if (unit == "g" || unit == "gb" || unit == "gib") multiplier = 1024.0 * 1024 * 1024;
  else if (unit == "t" || unit == "tb" || unit == "tib") multiplier = 1024.0 * 1024 * 1024 * 1024;
  else return std::nullopt;
  const double bytes = number * multiplier;
  if (!std::isfinite(bytes) || bytes > 1024.0 * 1024 * 1024 * 1024 * 1024) return std::nullopt;
  return static_cast<std::uint64_t>(std::llround(bytes));
}

// PyTorch's format_size (c10/cuda/CUDACachingAllocator.cpp), so the OOM line reads as real ones.
std::string format_size(std::uint64_t bytes) {
  char text[64];
  const double value = static_cast<double>(bytes);
  if (bytes <= 1024) std::snprintf(text, sizeof text, "%llu bytes", static_cast<unsigned long long>(bytes));
  else if (bytes <= 1048576) std::snprintf(text, sizeof text, "%.2f KiB", value / 1024.0);
  else if (bytes <= 1073741824ull) std::snprintf(text, sizeof text, "%.2f MiB", value / 1048576.0);
  else std::snprintf(text, sizeof text, "%.2f GiB", value / 1073741824.0);
  return text;
}

Options parse_options(int argc, char** argv) {
  Options options;
  bool have_mem = false;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") usage_error("a stand-in GPU job for gpuslot's tests");
    if (i + 1 >= argc) usage_error(flag + " needs a value");
    const std::string value = argv[++i];
    char* end = nullptr;
    if (flag == "--mem") {
      const auto bytes = parse_size(value);
      if (!bytes) usage_error("invalid size '" + value + "': expected e.g. 512M, 8G, 10GiB, 0.5G");
      options.bytes = *bytes;
      have_mem = true;
    } else if (flag == "--seconds") {
      options.seconds = std::strtod(value.c_str(), &end);
      if (value.empty() || *end != '\0' || !std::isfinite(options.seconds) || options.seconds < 0) {
        usage_error("invalid --seconds '" + value + "'");
      }
    } else if (flag == "--exit") {
      const long code = std::strtol(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || code < 0 || code > 255) usage_error("invalid --exit '" + value + "'");
      options.exit_code = static_cast<int>(code);
    } else if (flag == "--touch") {
      options.touch_file = value;
    } else {
      usage_error("unknown option '" + flag + "'");
    }
  }
  if (!have_mem) usage_error("--mem SIZE is required");
  return options;
}

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "fake-gpu-job: %s\n", message.c_str());
  std::exit(kUsageExit);
}

// Takes the memory under the lock, or prints PyTorch's out-of-memory error and exits 1.
Allocation allocate(const std::string& host_path, const Options& options) {
  AllocationLock lock(host_path);
  if (!lock.held()) fail(lock.error());
  const HostRead read = read_host_file(host_path);
  if (read.status != HostRead::Status::ok) fail(read.error);
  const Host& host = *read.host;

  const auto index = cuda_device_zero(host, std::getenv("CUDA_VISIBLE_DEVICES"), std::getenv("CUDA_DEVICE_ORDER"));
  if (!index) {
    // What `torch.zeros(1, device="cuda")` prints when CUDA sees no device.
    std::fprintf(stderr, "RuntimeError: No CUDA GPUs are available\n");
    std::exit(1);
  }
  const HostGpu& gpu = host.gpus[*index];
  std::vector<Allocation> live = read_live_allocations(host_path);
  const std::uint64_t used = used_bytes(gpu, live);
  const std::uint64_t free = gpu.lost || used >= gpu.memory_total_bytes ? 0 : gpu.memory_total_bytes - used;
  if (options.bytes > free) {
    std::fprintf(stderr,
                 "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate %s. GPU 0 has a total capacity "
                 "of %s of which %s is free.\n",
                 format_size(options.bytes).c_str(), format_size(gpu.memory_total_bytes).c_str(),
                 format_size(free).c_str());
    std::exit(1);
  }
  const auto start_time = process_start_time(static_cast<unsigned int>(::getpid()));
  if (!start_time) fail("cannot read /proc/self/stat");
  Allocation mine{static_cast<unsigned int>(::getpid()), gpu.uuid, options.bytes, *start_time};
  live.push_back(mine);  // rewriting the live list also sweeps out dead holders
  if (const std::string error = write_allocations(host_path, live); !error.empty()) fail(error);
  return mine;
}

void release(const std::string& host_path, const Allocation& mine) {
  AllocationLock lock(host_path);
  if (!lock.held()) return;  // nothing better to do; readers drop us once we exit anyway
  std::vector<Allocation> live = read_live_allocations(host_path);
  std::erase_if(live, [&](const Allocation& a) { return a.pid == mine.pid; });
  write_allocations(host_path, live);
}

// Sleeps with SIGTERM/SIGINT blocked and collected by sigtimedwait, so a signal that arrives
// at any moment after the allocation is recorded is handled without a racy handler. Returns
// the signal received, or 0 when the time ran out.
int wait_for(double seconds, const sigset_t& stop_signals) {
  using clock = std::chrono::steady_clock;
  const auto deadline = clock::now() + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(seconds));
  for (;;) {
    const auto left = deadline - clock::now();
    if (left <= clock::duration::zero()) return 0;
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
    const timespec timeout{static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)};
    const int signal_number = ::sigtimedwait(&stop_signals, nullptr, &timeout);
    if (signal_number > 0) return signal_number;
    if (errno != EAGAIN && errno != EINTR) return 0;
  }
}

void append_line(const std::string& path, const std::string& line) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0666);
  if (fd < 0) fail("cannot open " + path + ": " + std::strerror(errno));
  // One write of a short line with O_APPEND: concurrent jobs' lines never interleave.
  const ssize_t written = ::write(fd, line.data(), line.size());
  ::close(fd);
  if (written != static_cast<ssize_t>(line.size())) fail("cannot append to " + path);
}

}  // namespace

int main(int argc, char** argv) {
  // Block first, so a SIGTERM that arrives while we take memory is held until we can give it back.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  sigprocmask(SIG_BLOCK, &stop_signals, nullptr);

  const Options options = parse_options(argc, argv);
  const char* host_env = std::getenv(kHostEnv);
  if (!host_env || !*host_env) fail(std::string(kHostEnv) + " is not set");
  const std::string host_path = host_env;

  const Allocation mine = allocate(host_path, options);
  // Always cuda:0: like most jobs, this one uses the first device its process can see.
  std::printf("fake-gpu-job: holding %s on %s (cuda:0)\n", format_size(mine.bytes).c_str(), mine.uuid.c_str());
  std::fflush(stdout);

  const int signal_number = wait_for(options.seconds, stop_signals);
  release(host_path, mine);
  if (signal_number != 0) {
    // Die by the signal, as a real job does, so the parent sees "killed by SIGTERM".
    ::signal(signal_number, SIG_DFL);
    sigprocmask(SIG_UNBLOCK, &stop_signals, nullptr);
    ::raise(signal_number);
    return 128 + signal_number;
  }
  if (!options.touch_file.empty()) append_line(options.touch_file, std::to_string(mine.pid) + " " + mine.uuid + "\n");
  return options.exit_code;
}
