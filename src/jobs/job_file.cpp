// job_file.cpp — reading a jobs file: plain shell lines or JSON Lines, all checked up front.
#include <sys/stat.h>

#include <algorithm>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "common/utf8.hpp"
#include "gpuslot/jobs.hpp"
#include "gpuslot/units.hpp"

namespace gpuslot {

namespace {

using nlohmann::json;

constexpr const char* kFields = "name, cmd, mem, gpus, group, after, retries, env, cwd, exclusive";
constexpr unsigned kMaxGpus = 64;
constexpr unsigned kMaxRetries = 100;

Error at_line(unsigned line, const std::string& message) {
  return make_error(Errc::bad_input, "line " + std::to_string(line) + ": " + message);
}

bool valid_name(std::string_view name) {
  if (name.empty() || name.size() > 128 || name.front() == '.' || name.front() == '-') return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
           c == '-' || c == '+' || c == '@' || c == ':';
  });
}

std::string_view trim(std::string_view text) {
  while (!text.empty() && (text.front() == ' ' || text.front() == '\t' || text.front() == '\r')) text.remove_prefix(1);
  while (!text.empty() && (text.back() == ' ' || text.back() == '\t' || text.back() == '\r')) text.remove_suffix(1);
  return text;
}

Result<unsigned> count_field(const json& value, const char* field, unsigned low, unsigned high, unsigned line) {
  if (!value.is_number_integer() || value.get<long long>() < low || value.get<long long>() > high) {
    return at_line(line, std::string("\"") + field + "\" must be a whole number from " + std::to_string(low) +
                             " to " + std::to_string(high) + ", got " + quote_for_message(value.dump()));
  }
  return unsigned(value.get<long long>());
}

Result<JobSpec> job_from_object(const json& object, unsigned line, const JobDefaults& defaults) {
  if (!object.is_object()) return at_line(line, "expected a JSON object {\"cmd\": …} per line");
  JobSpec job;
  job.line = line;
  job.memory_bytes = defaults.memory_bytes;
  job.gpus = defaults.gpus;
  job.oom_retries = defaults.oom_retries;
  for (const auto& [key, value] : object.items()) {
    if (key == "name") {
      if (!value.is_string() || !valid_name(value.get<std::string>())) {
        return at_line(line, "\"name\" must be 1-128 characters of letters, digits and . _ - + @ : (not starting with . or -), got " +
                                 quote_for_message(value.dump()));
      }
      job.name = value.get<std::string>();
    } else if (key == "cmd") {
      if (value.is_string()) {
        job.shell = value.get<std::string>();
        if (trim(job.shell).empty()) return at_line(line, "\"cmd\" is empty");
      } else if (value.is_array() && !value.empty()) {
        for (const auto& word : value) {
          if (!word.is_string()) return at_line(line, "\"cmd\" as a list must hold only strings (argv)");
          job.argv.push_back(word.get<std::string>());
        }
        if (job.argv.front().empty()) return at_line(line, "\"cmd\" starts with an empty program name");
      } else {
        return at_line(line, "\"cmd\" must be a string (run by /bin/sh -c) or a non-empty list of strings (argv)");
      }
    } else if (key == "mem") {
      std::string text;
      if (value.is_string()) text = value.get<std::string>();
      else if (value.is_number_unsigned() || value.is_number_integer()) text = std::to_string(value.get<long long>());
      else return at_line(line, "\"mem\" must be a size like \"8G\", \"512M\" or a number of MiB");
      auto bytes = parse_size_bytes(text);
      if (!bytes) return at_line(line, "\"mem\": " + bytes.error().message);
      job.memory_bytes = *bytes;
    } else if (key == "gpus") {
      auto count = count_field(value, "gpus", 1, kMaxGpus, line);
      if (!count) return count.error();
      job.gpus = *count;
    } else if (key == "group") {
      if (!value.is_string() || value.get<std::string>().empty()) return at_line(line, "\"group\" must be a non-empty string");
      job.group = value.get<std::string>();
    } else if (key == "after") {
      if (value.is_string()) {
        job.after.push_back(value.get<std::string>());
      } else if (value.is_array()) {
        for (const auto& name : value) {
          if (!name.is_string()) return at_line(line, "\"after\" must be a list of job names");
          job.after.push_back(name.get<std::string>());
        }
      } else {
        return at_line(line, "\"after\" must be a list of job names");
      }
    } else if (key == "retries") {
      if (value.is_object()) {
        for (const auto& [kind, count_value] : value.items()) {
          if (kind != "oom" && kind != "failure") {
            return at_line(line, "unknown key " + quote_for_message(kind) + " in \"retries\"; accepted: oom, failure");
          }
          auto count = count_field(count_value, kind == "oom" ? "retries.oom" : "retries.failure", 0, kMaxRetries, line);
          if (!count) return count.error();
          (kind == "oom" ? job.oom_retries : job.failure_retries) = *count;
        }
      } else {
        auto count = count_field(value, "retries", 0, kMaxRetries, line);
        if (!count) return count.error();
        job.oom_retries = *count;
      }
    } else if (key == "env") {
      if (!value.is_object()) return at_line(line, "\"env\" must be an object of strings {\"NAME\": \"value\"}");
      for (const auto& [name, setting] : value.items()) {
        if (name.empty() || name.find('=') != std::string::npos || !setting.is_string()) {
          return at_line(line, "\"env\" entry " + quote_for_message(name) + " must be a NAME without '=' and a string value");
        }
        job.env.emplace_back(name, setting.get<std::string>());
      }
    } else if (key == "cwd") {
      if (!value.is_string() || value.get<std::string>().empty()) return at_line(line, "\"cwd\" must be a directory path");
      job.cwd = value.get<std::string>();
    } else if (key == "exclusive") {
      if (!value.is_boolean()) return at_line(line, "\"exclusive\" must be true or false");
      job.exclusive = value.get<bool>();
    } else {
      return at_line(line, "unknown field " + quote_for_message(key) + "; accepted: " + kFields);
    }
  }
  if (job.shell.empty() && job.argv.empty()) return at_line(line, "missing \"cmd\" (the command to run)");
  // A JSON "\u0000" decodes to a NUL, which no command word, environment entry or path can hold.
  auto has_nul = [](const std::string& text) { return text.find('\0') != std::string::npos; };
  bool nul = has_nul(job.shell) || has_nul(job.cwd) || has_nul(job.group);
  for (const auto& word : job.argv) nul = nul || has_nul(word);
  for (const auto& name : job.after) nul = nul || has_nul(name);
  for (const auto& [name, setting] : job.env) nul = nul || has_nul(name) || has_nul(setting);
  if (nul) return at_line(line, "a string holds a NUL character (\\u0000); commands, env, cwd, group and after cannot");
  return job;
}

// Checks what needs the whole batch: names, `after`, cycles, directories.
Result<void> check_batch(std::vector<JobSpec>& jobs) {
  std::map<std::string, std::size_t> by_name;
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    auto [it, inserted] = by_name.emplace(jobs[i].name, i);
    if (!inserted) {
      return at_line(jobs[i].line, "name " + quote_for_message(jobs[i].name) + " is already used by line " +
                                       std::to_string(jobs[it->second].line));
    }
  }
  for (auto& job : jobs) {
    std::set<std::string> seen;
    for (const auto& name : job.after) {
      if (by_name.find(name) == by_name.end()) {
        return at_line(job.line, "\"after\" names " + quote_for_message(name) + ", which is no job in this file");
      }
      if (name == job.name) return at_line(job.line, "job " + quote_for_message(job.name) + " waits for itself in \"after\"");
      if (!seen.insert(name).second) return at_line(job.line, "\"after\" lists " + quote_for_message(name) + " twice");
    }
    if (!job.cwd.empty()) {
      struct stat info {};
      if (::stat(job.cwd.c_str(), &info) != 0 || !S_ISDIR(info.st_mode)) {
        return at_line(job.line, "\"cwd\" " + quote_for_message(job.cwd) + " is not an existing directory");
      }
    }
  }
  // Cycles: depth-first search with colours; report the cycle by name.
  std::vector<int> colour(jobs.size(), 0);
  std::vector<std::size_t> stack;
  std::function<std::optional<std::string>(std::size_t)> visit = [&](std::size_t i) -> std::optional<std::string> {
    colour[i] = 1;
    stack.push_back(i);
    for (const auto& name : jobs[i].after) {
      const std::size_t next = by_name[name];
      if (colour[next] == 1) {
        std::string cycle;
        auto start = std::find(stack.begin(), stack.end(), next);
        for (auto it = start; it != stack.end(); ++it) cycle += jobs[*it].name + " → ";
        return cycle + jobs[next].name;
      }
      if (colour[next] == 0) {
        if (auto found = visit(next)) return found;
      }
    }
    stack.pop_back();
    colour[i] = 2;
    return std::nullopt;
  };
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    if (colour[i] != 0) continue;
    if (auto cycle = visit(i)) {
      return at_line(jobs[i].line, "\"after\" forms a cycle: " + *cycle + " (no job of it could ever start)");
    }
  }
  return {};
}

}  // namespace

std::string JobSpec::display_command() const {
  if (argv.empty()) return shell;
  std::string text;
  for (const auto& word : argv) {
    if (!text.empty()) text += ' ';
    const bool plain = !word.empty() && word.find_first_of(" \t\n'\"\\$`;&|<>*?()[]{}#~") == std::string::npos;
    if (plain) {
      text += word;
    } else {
      text += '\'';
      for (char c : word) text += c == '\'' ? std::string("'\\''") : std::string(1, c);
      text += '\'';
    }
  }
  return text;
}

Result<std::vector<JobSpec>> parse_jobs(std::string_view text, const JobDefaults& defaults) {
  std::vector<JobSpec> jobs;
  jobs.reserve(std::size_t(std::count(text.begin(), text.end(), '\n')) + 1);  // no doubling peak for 100 000 jobs
  std::optional<bool> json_lines;
  unsigned line = 0;
  std::size_t position = 0;
  while (position < text.size()) {
    const std::size_t end = std::min(text.find('\n', position), text.size());
    const std::string_view raw = text.substr(position, end - position);
    position = end + 1;
    ++line;
    const std::string_view content = trim(raw);
    if (content.empty() || content.front() == '#') continue;
    if (raw.find('\0') != std::string_view::npos) return at_line(line, "contains a NUL byte; a jobs file is text");
    if (const std::size_t bad = utf8::first_invalid(raw); bad != std::string_view::npos) {
      return at_line(line, "byte " + std::to_string(bad + 1) + " is not valid UTF-8; a jobs file is UTF-8 text");
    }
    if (!json_lines) json_lines = content.front() == '{';
    JobSpec job;
    if (*json_lines) {
      json object = json::parse(content, nullptr, /*allow_exceptions=*/false);
      if (object.is_discarded()) {
        return at_line(line, "not valid JSON; a JSON Lines jobs file holds one {\"cmd\": …} object per line");
      }
      auto parsed = job_from_object(object, line, defaults);
      if (!parsed) return parsed.error();
      job = std::move(*parsed);
    } else {
      job.line = line;
      job.shell = std::string(content);
      job.memory_bytes = defaults.memory_bytes;
      job.gpus = defaults.gpus;
      job.oom_retries = defaults.oom_retries;
    }
    if (job.name.empty()) job.name = "job-" + std::to_string(line);
    jobs.push_back(std::move(job));
  }
  if (jobs.empty()) return make_error(Errc::bad_input, "the jobs file holds no jobs (only blank or # comment lines)");
  if (auto checked = check_batch(jobs); !checked) return checked.error();
  return jobs;
}

std::string job_to_json(const JobSpec& job) {
  json object;
  object["name"] = job.name;
  if (job.argv.empty()) object["cmd"] = job.shell;
  else object["cmd"] = job.argv;
  object["mem"] = std::to_string(job.memory_bytes / (1024 * 1024)) + "M";
  if (job.memory_bytes % (1024 * 1024) != 0) object["mem"] = std::to_string(job.memory_bytes) + "B";
  object["gpus"] = job.gpus;
  if (!job.group.empty()) object["group"] = job.group;
  if (!job.after.empty()) object["after"] = job.after;
  object["retries"] = {{"oom", job.oom_retries}, {"failure", job.failure_retries}};
  if (!job.env.empty()) {
    json env = json::object();
    for (const auto& [name, value] : job.env) env[name] = value;
    object["env"] = env;
  }
  if (!job.cwd.empty()) object["cwd"] = job.cwd;
  if (job.exclusive) object["exclusive"] = true;
  // parse_jobs refuses text that is not UTF-8; a JobSpec built by a library caller may still hold
  // such bytes: U+FFFD in the journal's copy rather than an exception.
  return object.dump(-1, ' ', false, json::error_handler_t::replace);
}

Result<JobSpec> job_from_json(std::string_view text, unsigned line) {
  json object = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (object.is_discarded()) return at_line(line, "stored job is not valid JSON");
  JobDefaults defaults;
  auto job = job_from_object(object, line, defaults);
  if (!job) return job;
  if (job->name.empty()) return at_line(line, "stored job has no name");
  return job;
}

bool looks_like_gpu_oom(std::string_view output) {
  static constexpr std::string_view kPatterns[] = {"CUDA out of memory", "CUDA_ERROR_OUT_OF_MEMORY",
                                                   "cudaErrorMemoryAllocation", "OutOfMemoryError"};
  for (auto pattern : kPatterns) {
    if (output.find(pattern) != std::string_view::npos) return true;
  }
  return false;
}

const char* job_state_name(JobState state) noexcept {
  switch (state) {
    case JobState::queued: return "queued";
    case JobState::running: return "running";
    case JobState::succeeded: return "succeeded";
    case JobState::failed: return "failed";
  }
  return "unknown";
}

bool BatchResult::all_succeeded() const {
  return !interrupted && std::all_of(jobs.begin(), jobs.end(), [](const JobStatus& job) { return job.state == JobState::succeeded; });
}

std::string logs_directory_of(const std::string& journal_path) {
  std::string base = journal_path;
  if (base.size() > 3 && base.compare(base.size() - 3, 3, ".db") == 0) base.resize(base.size() - 3);
  return base + ".logs";
}

}  // namespace gpuslot
