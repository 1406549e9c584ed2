// slurm_commands.cpp — Slurm's commands: running them, building their command lines, reading
// their output; the batch script of one attempt.
#include "jobs/slurm_commands.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <sstream>

#include "jobs/shepherd.hpp"

extern char** environ;

namespace gpuslot::jobs_internal {

namespace {

std::vector<std::string_view> lines_of(std::string_view text) {
  std::vector<std::string_view> lines;
  while (!text.empty()) {
    const std::size_t end = text.find('\n');
    std::string_view line = text.substr(0, end);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (!line.empty()) lines.push_back(line);
    if (end == std::string_view::npos) break;
    text.remove_prefix(end + 1);
  }
  return lines;
}

// A row "first|middle…|a|b|c": the first field, the last three, and what lies between (which may
// itself hold '|', as a job name may).
std::optional<SlurmJobRow> split_row(std::string_view line) {
  const std::size_t first = line.find('|');
  if (first == std::string_view::npos) return std::nullopt;
  std::size_t cut = line.size();
  std::string_view tail[3];
  for (int i = 2; i >= 0; --i) {
    if (cut == 0) return std::nullopt;
    const std::size_t bar = line.rfind('|', cut - 1);
    if (bar == std::string_view::npos || bar <= first) return std::nullopt;
    tail[i] = line.substr(bar + 1, cut - bar - 1);
    cut = bar;
  }
  SlurmJobRow row;
  row.id = std::string(line.substr(0, first));
  row.name = std::string(line.substr(first + 1, cut - first - 1));
  row.state = std::string(tail[0]);
  row.node = std::string(tail[1]);
  row.reason = std::string(tail[2]);
  if (row.id.empty()) return std::nullopt;
  return row;
}

bool contains(std::string_view text, std::string_view part) { return text.find(part) != std::string_view::npos; }

}  // namespace

// --- running a command ----------------------------------------------------------------------------

Result<CommandOutput> run_command(const std::vector<std::string>& argv, std::chrono::milliseconds timeout, int keep_fd) {
  int out_pipe[2], err_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0) return make_error(Errc::state, std::string("pipe: ") + std::strerror(errno));
  if (::pipe2(err_pipe, O_CLOEXEC) != 0) {
    ::close(out_pipe[0]);
    ::close(out_pipe[1]);
    return make_error(Errc::state, std::string("pipe: ") + std::strerror(errno));
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, out_pipe[1], 1);
  posix_spawn_file_actions_adddup2(&actions, err_pipe[1], 2);
  posix_spawnattr_t attributes;
  posix_spawnattr_init(&attributes);
  sigset_t none, defaults;
  sigemptyset(&none);
  sigemptyset(&defaults);
  for (int signal_number : {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE, SIGCHLD}) sigaddset(&defaults, signal_number);
  posix_spawnattr_setsigmask(&attributes, &none);
  posix_spawnattr_setsigdefault(&attributes, &defaults);
  posix_spawnattr_setpgroup(&attributes, 0);
  posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP);
  int kept_flags = -1;
  if (keep_fd >= 0) {
    kept_flags = ::fcntl(keep_fd, F_GETFD);
    ::fcntl(keep_fd, F_SETFD, kept_flags & ~FD_CLOEXEC);
  }
  std::vector<char*> words;
  for (const auto& word : argv) words.push_back(const_cast<char*>(word.c_str()));
  words.push_back(nullptr);
  pid_t pid = 0;
  const int rc = ::posix_spawnp(&pid, words[0], &actions, &attributes, words.data(), environ);
  if (keep_fd >= 0) ::fcntl(keep_fd, F_SETFD, kept_flags);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attributes);
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  if (rc != 0) {
    ::close(out_pipe[0]);
    ::close(err_pipe[0]);
    return make_error(Errc::state, "cannot run " + quote_for_message(argv[0]) + ": " + std::strerror(rc));
  }
  CommandOutput result;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  std::string* sinks[2] = {&result.out, &result.err};
  int open_count = 2;
  while (open_count > 0) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      result.timed_out = true;
      ::kill(-pid, SIGKILL);
      break;
    }
    if (::poll(fds, 2, int(std::min<long long>(left.count(), 1000))) < 0 && errno != EINTR) break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      char buffer[4096];
      const ssize_t n = ::read(fds[i].fd, buffer, sizeof buffer);
      if (n > 0) {
        sinks[i]->append(buffer, std::size_t(n));
      } else if (n == 0 || errno != EINTR) {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open_count;
      }
    }
  }
  for (auto& fd : fds) {
    if (fd.fd >= 0) ::close(fd.fd);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFSIGNALED(status)) result.signal = WTERMSIG(status);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + result.signal.value_or(0);
  return result;
}

bool on_path(const std::string& program) {
  const char* path = std::getenv("PATH");
  std::stringstream entries(path != nullptr ? path : "/usr/bin:/bin");
  for (std::string directory; std::getline(entries, directory, ':');) {
    const std::string candidate = (directory.empty() ? "." : directory) + "/" + program;
    struct stat info {};
    if (::stat(candidate.c_str(), &info) == 0 && S_ISREG(info.st_mode) && ::access(candidate.c_str(), X_OK) == 0) return true;
  }
  return false;
}

// --- names and scripts ----------------------------------------------------------------------------

std::string slurm_job_name(const std::string& batch_id, const std::string& job_name, unsigned attempt) {
  return job_name + "." + std::to_string(attempt) + ".gpuslot-" + batch_id;
}

std::string shell_quote(std::string_view text) {
  std::string quoted = "'";
  for (char c : text) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

std::string escape_slurm_filename(std::string_view path) {
  std::string escaped;
  for (char c : path) escaped += c == '%' ? std::string("%%") : std::string(1, c);
  return escaped;
}

std::string batch_script(const ScriptInput& input) {
  const JobSpec& job = *input.job;
  std::vector<std::string> command = job.argv;
  if (command.empty()) command = direct_argv(job.shell).value_or(std::vector<std::string>{"/bin/sh", "-c", job.shell});
  std::string line = "env --";
  for (const auto& [name, value] : job.env) line += " " + shell_quote(name + "=" + value);
  line += " " + shell_quote("GPUSLOT_JOB_NAME=" + job.name) + " " + shell_quote("GPUSLOT_JOB_ATTEMPT=" + std::to_string(input.attempt));
  line += " " + shell_quote(input.gpuslot_path) + " run --mem " + std::to_string(job.memory_bytes) + "B --gpus " +
          std::to_string(job.gpus);
  if (input.gpu_wait.count() > 0) line += " --wait " + std::to_string(input.gpu_wait.count()) + "ms";
  if (input.export_format == ExportFormat::uuid) line += " --export uuid";
  line += " --";
  for (const auto& word : command) line += " " + shell_quote(word);

  std::string script = "#!/bin/sh\n";
  script += "# gpuslot batch: job " + shell_quote(job.name) + ", attempt " + std::to_string(input.attempt) + ", journal " +
            shell_quote(input.journal) + ".\n";
  script += "# Written for this one submission. It runs the command under `gpuslot run` (the same memory\n"
            "# check, CUDA_DEVICE_ORDER and environment as a local batch) and appends its start, exit\n"
            "# status and end to the run file, which gpuslot reads when Slurm no longer knows the job.\n";
  script += "run=" + shell_quote(input.run_path) + "\n";
  script += "printf 'start %s %s %s %s\\n' \"$(date +%s.%N)\" \"${SLURM_JOB_ID:-}\" \"${SLURMD_NODENAME:-$(uname -n)}\" "
            "\"${SLURM_JOB_GPUS:--}\" >> \"$run\"\n";
  script += "cd " + shell_quote(input.cwd) + " || { printf 'error 126 cannot change to directory %s\\n' " +
            shell_quote(input.cwd) + " >> \"$run\"; exit 126; }\n";
  script += line + "\n";
  script += "status=$?\n";
  script += "printf 'exit %d\\nend %s\\n' \"$status\" \"$(date +%s.%N)\" >> \"$run\"\n";
  script += "exit \"$status\"\n";
  return script;
}

std::vector<std::string> sbatch_command(const SbatchInput& input) {
  std::vector<std::string> argv = {"sbatch",
                                   "--parsable",
                                   "--job-name=" + input.job_name,
                                   "--comment=" + input.comment,
                                   "--output=" + escape_slurm_filename(input.out_path),
                                   "--error=" + escape_slurm_filename(input.err_path),
                                   "--nodes=1",
                                   "--ntasks=1",
                                   "--gres=gpu:" + std::to_string(input.gpus),
                                   "--kill-on-invalid-dep=no"};
  if (!input.afterok.empty()) {
    std::string dependency = "--dependency=afterok";
    for (const auto& id : input.afterok) dependency += ":" + id;
    argv.push_back(dependency);
  }
  if (!input.nodelist.empty()) argv.push_back("--nodelist=" + input.nodelist);
  if (!input.options->partition.empty()) argv.push_back("--partition=" + input.options->partition);
  if (!input.options->account.empty()) argv.push_back("--account=" + input.options->account);
  argv.insert(argv.end(), input.options->sbatch_args.begin(), input.options->sbatch_args.end());
  argv.push_back(input.script_path);
  return argv;
}

// --- parsing ------------------------------------------------------------------------------------

std::optional<std::string> parse_sbatch_id(std::string_view out) {
  for (std::string_view line : lines_of(out)) {
    line = line.substr(0, line.find(';'));
    if (!line.empty() && line.find_first_not_of("0123456789") == std::string_view::npos) return std::string(line);
  }
  return std::nullopt;
}

SbatchRefusal classify_sbatch_failure(const CommandOutput& result) {
  if (result.timed_out || result.signal) return SbatchRefusal::uncertain;
  const std::string& err = result.err;
  // The controller answered that nothing can ever run this job.
  for (const char* never : {"Requested node configuration is not available", "Invalid generic resource",
                            "Invalid GRES", "gres/gpu count too large"}) {
    if (contains(err, never)) return SbatchRefusal::never_fits;
  }
  // No answer, or "not now" (submit limits, a busy controller): the job may even have been
  // accepted (a lost reply), so it is looked up by name before it is submitted again.
  for (const char* later : {"Socket timed out", "Unable to contact", "Zero Bytes were transmitted", "Connection refused",
                            "Communication connection failure", "temporarily", "not responding", "MaxSubmit",
                            "submit limit", "Resource temporarily unavailable", "Transport endpoint"}) {
    if (contains(err, later)) return SbatchRefusal::uncertain;
  }
  return SbatchRefusal::refused;
}

std::vector<SlurmJobRow> parse_squeue(std::string_view out) {
  std::vector<SlurmJobRow> rows;
  for (std::string_view line : lines_of(out)) {
    if (auto row = split_row(line)) rows.push_back(std::move(*row));
  }
  return rows;
}

std::map<std::string, std::string> parse_scontrol_fields(std::string_view line) {
  std::map<std::string, std::string> fields;
  std::string* last = nullptr;
  std::istringstream words{std::string(line)};
  for (std::string word; words >> word;) {
    const std::size_t equals = word.find('=');
    // Keys are CamelCase words, possibly with ':' or '/' ("AllocNode:Sid", "CPUs/Task"); a word of
    // a value that happens to hold '=' ("Command=/x a=b") does not start with a capital.
    const bool key = equals != std::string::npos && equals > 0 && word[0] >= 'A' && word[0] <= 'Z' &&
                     word.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_:/") >= equals;
    if (key) {
      last = &fields[word.substr(0, equals)];
      *last = word.substr(equals + 1);
    } else if (last != nullptr) {
      *last += " " + word;
    }
  }
  return fields;
}

std::vector<SlurmJobRow> parse_sacct(std::string_view out) {
  std::vector<SlurmJobRow> rows;
  for (std::string_view line : lines_of(out)) {
    auto row = split_row(line);
    if (!row) continue;
    // split_row reads "id|name|state|exit|node" as state=state, node=exit, reason=node.
    SlurmJobRow sacct;
    sacct.id = row->id;
    sacct.name = row->name;
    sacct.state = row->state.substr(0, row->state.find(' '));
    sacct.reason = row->node;
    sacct.node = row->reason;
    rows.push_back(std::move(sacct));
  }
  return rows;
}

SlurmExit parse_slurm_exit_code(std::string_view text) {
  SlurmExit result;
  const std::size_t colon = text.find(':');
  const std::string code(text.substr(0, colon));
  const std::string signal = colon == std::string_view::npos ? std::string() : std::string(text.substr(colon + 1));
  char* end = nullptr;
  const long signal_number = signal.empty() ? 0 : std::strtol(signal.c_str(), &end, 10);
  if (signal_number > 0) {
    result.signal = int(signal_number);
    return result;
  }
  if (!code.empty() && code.find_first_not_of("0123456789") == std::string::npos) result.exit_code = std::atoi(code.c_str());
  return result;
}

bool slurm_state_is_final(std::string_view state) {
  for (std::string_view final_state : {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                                       "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY", "REVOKED"}) {
    if (state == final_state) return true;
  }
  return false;
}

bool slurm_state_is_running(std::string_view state) {
  for (std::string_view running : {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT"}) {
    if (state == running) return true;
  }
  return false;
}

ScriptRecord parse_script_record(std::string_view run_file) {
  ScriptRecord record;
  for (std::string_view line : lines_of(run_file)) {
    std::istringstream fields{std::string(line)};
    std::string kind, time;
    fields >> kind >> time;
    char* end = nullptr;
    const double when = std::strtod(time.c_str(), &end);
    const bool has_time = end != time.c_str();
    if (kind == "start") {
      // A job Slurm requeued starts again: the latest start line is the one that counts.
      record = ScriptRecord{};
      if (has_time) record.started_at = when;
      std::string gpus;
      fields >> record.slurm_job_id >> record.node >> gpus;
      std::stringstream list(gpus);
      for (std::string index; std::getline(list, index, ',');) {
        if (!index.empty() && index.find_first_not_of("0123456789") == std::string::npos) record.gpus.push_back(unsigned(std::stoul(index)));
      }
    } else if (kind == "end" && has_time) {
      record.ended_at = when;
    }
  }
  return record;
}

std::optional<AttemptEnd> slurm_attempt_end(const std::optional<AttemptOutcome>& script,
                                            const std::optional<SlurmJobRow>& final_row, const SlurmExit& slurm_exit) {
  AttemptEnd end;
  if (script) {
    end.exit_code = script->exit_code;
    end.signal = script->signal;
    end.how = script->error;
    return end;
  }
  if (!final_row) return std::nullopt;
  if (final_row->state == "COMPLETED") {
    end.exit_code = 0;
    return end;
  }
  // Not COMPLETED is never a success, even where Slurm says 0:0 (a job cancelled while pending).
  if (slurm_exit.exit_code != 0) end.exit_code = slurm_exit.exit_code;
  end.signal = slurm_exit.signal;
  end.how = "ended by Slurm: " + final_row->state;
  if (final_row->state == "OUT_OF_MEMORY") {
    end.how += " (host memory, not GPU memory: ask for more with --sbatch-arg=--mem=SIZE)";
  } else if (!final_row->reason.empty() && final_row->reason != "None" && final_row->state != "CANCELLED") {
    // (A cancelled job keeps the reason it last pended for, which would read as the cause.)
    end.how += " (" + final_row->reason + ")";
  }
  return end;
}

bool gpuslot_run_found_no_room(std::string_view output) {
  // The texts of Errc::timeout from Ledger::reserve_waiting (wait_queue.cpp) and of run's
  // nothing-fits hint (cmd_run.cpp), as cli::run prints them.
  for (std::string_view marker : {"gpuslot: timed out waiting for room", "(add --wait to wait for room)"}) {
    if (output.find(marker) != std::string_view::npos) return true;
  }
  return false;
}

std::string first_line(std::string_view text) {
  const std::size_t start = text.find_first_not_of(" \n\r\t");
  if (start == std::string_view::npos) return "";
  const std::size_t end = text.find('\n', start);
  std::string line(text.substr(start, end == std::string_view::npos ? std::string_view::npos : end - start));
  for (char& c : line) {
    if (c == '\r' || c == '\t') c = ' ';
  }
  return line;
}

std::string sbatch_message(const CommandOutput& result) {
  std::string line = first_line(result.err.empty() ? result.out : result.err);
  for (const char* prefix : {"sbatch: error: ", "sbatch: ", "Batch job submission failed: "}) {
    if (line.rfind(prefix, 0) == 0) line.erase(0, std::strlen(prefix));
  }
  return line;
}

std::string slurm_time(double unix_seconds) {
  const std::time_t seconds = std::time_t(unix_seconds);
  std::tm local{};
  ::localtime_r(&seconds, &local);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%S", &local);
  return text;
}

}  // namespace gpuslot::jobs_internal
