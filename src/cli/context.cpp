#include "cli/context.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <filesystem>

namespace gpuslot::cli {

namespace {

bool want_color(int fd) {
  const char* no_color = std::getenv("NO_COLOR");
  if (no_color != nullptr && *no_color != '\0') return false;  // https://no-color.org
  const char* term = std::getenv("TERM");
  if (term != nullptr && std::string_view(term) == "dumb") return false;
  return isatty(fd) == 1;
}

std::string executable_dir(const char* argv0) {
  char buffer[PATH_MAX];
  const ssize_t length = readlink("/proc/self/exe", buffer, sizeof buffer - 1);
  if (length > 0) {
    buffer[length] = '\0';
    return std::filesystem::path(buffer).parent_path().string();
  }
  return std::filesystem::absolute(argv0).parent_path().string();
}

}  // namespace

void Context::prepare(const char* argv0) {
  exe_dir_ = executable_dir(argv0);
  color_stdout_ = want_color(STDOUT_FILENO);
  color_stderr_ = want_color(STDERR_FILENO);
  if (options.simulate.empty()) return;

  std::error_code ignored;
  if (!std::filesystem::is_regular_file(options.simulate, ignored)) {
    throw CommandError(make_error(Errc::bad_input, "--simulate: host file '" + options.simulate +
                                                       "' does not exist; expected a host JSON such as examples/hosts/8x4090.json"));
  }
  const std::string host = std::filesystem::absolute(options.simulate).string();
  // The environment of *this* process is ours to set here: nothing has started a thread or
  // loaded NVML yet. Children (run, batch) inherit the host so fake jobs see the same GPUs.
  setenv("GPUSLOT_FAKE_NVML_HOST", host.c_str(), 1);
  nvml_path_ = bundled_fake_nvml();
  setenv("GPUSLOT_NVML_LIBRARY", nvml_path_.c_str(), 1);
  if (std::getenv("GPUSLOT_STATE_DIR") == nullptr) {
    // A dry run must not reserve real GPUs' room: simulated leases live apart.
    const char* tmp = std::getenv("TMPDIR");
    const std::string dir = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/gpuslot-simulated";
    setenv("GPUSLOT_STATE_DIR", dir.c_str(), 1);
  }
}

std::string Context::bundled_fake_nvml() const {
  return (std::filesystem::path(exe_dir_) / ".." / "libexec" / "gpuslot" / "libnvidia-ml.so.1").lexically_normal().string();
}

// With --simulate a failing init means the host file is wrong: that is bad input, and the fake's
// own stderr line (which names the field) is folded into our one-line error.
Result<std::shared_ptr<NvmlLibrary>> Context::open_capturing_simulation_errors() {
  if (options.simulate.empty()) return NvmlLibrary::open(nvml_path_);
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC | O_NONBLOCK) != 0) return NvmlLibrary::open(nvml_path_);
  std::fflush(stderr);
  const int saved = ::dup(STDERR_FILENO);
  ::dup2(pipe_fds[1], STDERR_FILENO);
  auto library = NvmlLibrary::open(nvml_path_);
  std::fflush(stderr);
  ::dup2(saved, STDERR_FILENO);
  ::close(saved);
  ::close(pipe_fds[1]);
  char buffer[1024] = {};
  const ssize_t n = ::read(pipe_fds[0], buffer, sizeof buffer - 1);
  ::close(pipe_fds[0]);
  std::string said = n > 0 ? std::string(buffer, std::size_t(n)) : std::string();
  if (library) {
    if (!said.empty()) std::fputs(said.c_str(), stderr);
    return library;
  }
  said = said.substr(0, said.find('\n'));
  Error error = library.error();
  error.code = Errc::bad_input;
  error.message = "--simulate: host file " + quote_for_message(options.simulate) + " was rejected: " +
                  (said.empty() ? error.message : said) + "; see examples/hosts/8x4090.json for the format";
  return error;
}

Result<std::shared_ptr<NvmlLibrary>> Context::nvml() {
  if (nvml_) return nvml_;
  if (nvml_error_) return *nvml_error_;
  auto library = open_capturing_simulation_errors();
  if (!library) {
    nvml_error_ = library.error();
    return library.error();
  }
  nvml_ = *library;
  return nvml_;
}

Result<Snapshot> Context::snapshot(bool with_processes) {
  auto library = nvml();
  if (!library) return library.error();
  return take_snapshot(**library, with_processes);
}

Result<Ledger*> Context::ledger() {
  if (ledger_) return &*ledger_;
  if (ledger_error_) return *ledger_error_;
  auto directory = open_state_directory();
  if (!directory) {
    ledger_error_ = directory.error();
    return directory.error();
  }
  ledger_.emplace(*directory);
  return &*ledger_;
}

OutstandingReservations Context::reservations(const Snapshot& snapshot, std::vector<LeaseRecord>* leases_out) {
  auto opened = ledger();
  if (!opened) {
    print_warning(*this, "leases not counted: " + opened.error().message);
    return {};
  }
  std::vector<std::string> warnings;
  std::vector<LeaseRecord> leases = (*opened)->live_leases(&warnings);
  for (const auto& warning : warnings) print_warning(*this, warning);
  OutstandingReservations outstanding = Ledger::outstanding(leases, snapshot);
  if (leases_out != nullptr) *leases_out = std::move(leases);
  return outstanding;
}

Visibility Context::visibility(const Snapshot& snapshot) const {
  Visibility visibility = resolve_visibility(snapshot, visibility_env_from_process());
  if (visibility.slurm && visibility.slurm->note && !slurm_note_shown_.exchange(true)) {
    print_warning(*this, *visibility.slurm->note);
  }
  return visibility;
}

void print_error(const std::string& message) { std::fprintf(stderr, "gpuslot: %s\n", message.c_str()); }

void print_warning(const Context& context, const std::string& message) {
  if (context.color_stderr()) std::fprintf(stderr, "\033[33mgpuslot: warning:\033[0m %s\n", message.c_str());
  else std::fprintf(stderr, "gpuslot: warning: %s\n", message.c_str());
}

}  // namespace gpuslot::cli
