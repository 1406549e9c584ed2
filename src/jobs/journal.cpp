// journal.cpp — SQLite journal of a batch.
#include "jobs/journal.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <malloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <sstream>

namespace gpuslot::jobs_internal {

namespace {

constexpr const char* kFormat = "gpuslot-batch-journal-1";

constexpr const char* kSchema = R"sql(
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE jobs(
  seq INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  spec TEXT NOT NULL,
  state TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  oom_failures INTEGER NOT NULL DEFAULT 0,
  other_failures INTEGER NOT NULL DEFAULT 0,
  gpu_uuids TEXT NOT NULL DEFAULT '',
  gpu_indices TEXT NOT NULL DEFAULT '',
  exit_code INTEGER,
  signal INTEGER,
  reason TEXT NOT NULL DEFAULT '',
  tail TEXT NOT NULL DEFAULT '',
  started_at REAL,
  ended_at REAL,
  not_before REAL,
  avoid TEXT NOT NULL DEFAULT '',
  slurm_job_id TEXT NOT NULL DEFAULT '',
  slurm_node TEXT NOT NULL DEFAULT '');
)sql";

std::string join(const std::vector<std::string>& items) {
  std::string text;
  for (const auto& item : items) text += (text.empty() ? "" : ",") + item;
  return text;
}

std::vector<std::string> split(const std::string& text) {
  std::vector<std::string> items;
  std::stringstream stream(text);
  for (std::string item; std::getline(stream, item, ',');) {
    if (!item.empty()) items.push_back(item);
  }
  return items;
}

std::optional<JobState> parse_state(std::string_view text) {
  for (JobState state : {JobState::queued, JobState::running, JobState::succeeded, JobState::failed}) {
    if (text == job_state_name(state)) return state;
  }
  return std::nullopt;
}

std::string column_text(sqlite3_stmt* statement, int column) {
  const auto* text = sqlite3_column_text(statement, column);
  return text == nullptr ? std::string() : std::string(reinterpret_cast<const char*>(text));
}

template <typename T>
std::optional<T> column_optional(sqlite3_stmt* statement, int column) {
  if (sqlite3_column_type(statement, column) == SQLITE_NULL) return std::nullopt;
  if constexpr (std::is_same_v<T, double>) return sqlite3_column_double(statement, column);
  else return T(sqlite3_column_int64(statement, column));
}

void bind_optional(sqlite3_stmt* statement, int index, const std::optional<double>& value) {
  if (value) sqlite3_bind_double(statement, index, *value);
  else sqlite3_bind_null(statement, index);
}

void bind_optional(sqlite3_stmt* statement, int index, const std::optional<int>& value) {
  if (value) sqlite3_bind_int(statement, index, *value);
  else sqlite3_bind_null(statement, index);
}

void bind_text(sqlite3_stmt* statement, int index, const std::string& text) {
  sqlite3_bind_text(statement, index, text.data(), int(text.size()), SQLITE_TRANSIENT);
}

Result<sqlite3*> open_database(const std::string& path, int flags) {
  sqlite3* db = nullptr;
  const int rc = sqlite3_open_v2(path.c_str(), &db, flags | SQLITE_OPEN_NOMUTEX, nullptr);
  if (rc != SQLITE_OK) {
    std::string message = db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    sqlite3_close(db);
    return make_error(Errc::state, "cannot open journal " + quote_for_message(path) + ": " + message);
  }
  sqlite3_busy_timeout(db, 10'000);
  return db;
}

}  // namespace

Error Journal::sqlite_error(const std::string& what) const {
  const int code = sqlite3_errcode(db_);
  const Errc errc = (code == SQLITE_CORRUPT || code == SQLITE_NOTADB) ? Errc::bad_input : Errc::state;
  return make_error(errc, "journal " + quote_for_message(path_) + ": " + what + ": " + sqlite3_errmsg(db_));
}

Result<void> Journal::exec(const char* sql) const {
  char* message = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &message) != SQLITE_OK) {
    std::string text = message != nullptr ? message : "unknown error";
    sqlite3_free(message);
    const int code = sqlite3_errcode(db_);
    const Errc errc = (code == SQLITE_CORRUPT || code == SQLITE_NOTADB) ? Errc::bad_input : Errc::state;
    return make_error(errc, "journal " + quote_for_message(path_) + ": " + text);
  }
  return {};
}

Journal::Journal(Journal&& other) noexcept
    : db_(other.db_), update_(other.update_), path_(std::move(other.path_)) {
  other.db_ = nullptr;
  other.update_ = nullptr;
}

Journal::~Journal() {
  if (update_ != nullptr) sqlite3_finalize(update_);
  if (db_ != nullptr) sqlite3_close(db_);
}

Result<Journal> Journal::create(const std::string& path, const std::vector<JobSpec>& jobs, const std::string& source,
                                std::uint64_t jobs_hash, const std::vector<std::pair<std::string, std::string>>& extra_meta) {
  struct stat info {};
  if (::lstat(path.c_str(), &info) == 0) {
    return make_error(Errc::state, "journal " + quote_for_message(path) +
                                       " already exists: add --resume to continue that batch, or pass --journal NEW to start afresh");
  }
  // Built under a temporary name and renamed into place once complete, so a journal that exists
  // is never half-written.
  const std::string temp = path + ".new";
  ::unlink(temp.c_str());
  auto db = open_database(temp, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
  if (!db) return db.error();
  Journal journal(*db, temp);
  auto fail = [&](Error error) -> Result<Journal> {
    sqlite3_close(journal.db_);
    journal.db_ = nullptr;
    ::unlink(temp.c_str());
    error.message = "cannot create journal " + quote_for_message(path) + ": " + error.message;
    return error;
  };
  if (auto done = journal.exec("PRAGMA journal_mode=DELETE; BEGIN"); !done) return fail(done.error());
  if (auto done = journal.exec(kSchema); !done) return fail(done.error());
  sqlite3_stmt* insert = nullptr;
  sqlite3_prepare_v2(journal.db_, "INSERT INTO meta(key, value) VALUES (?1, ?2)", -1, &insert, nullptr);
  std::vector<std::pair<std::string, std::string>> entries{
      {"format", kFormat}, {"jobs_file", source}, {"jobs_hash", std::to_string(jobs_hash)}, {"jobs", std::to_string(jobs.size())}};
  entries.insert(entries.end(), extra_meta.begin(), extra_meta.end());
  for (const auto& [key, value] : entries) {
    bind_text(insert, 1, key);
    bind_text(insert, 2, value);
    if (sqlite3_step(insert) != SQLITE_DONE) {
      sqlite3_finalize(insert);
      return fail(journal.sqlite_error("writing"));
    }
    sqlite3_reset(insert);
  }
  sqlite3_finalize(insert);
  sqlite3_prepare_v2(journal.db_, "INSERT INTO jobs(seq, name, spec, state) VALUES (?1, ?2, ?3, 'queued')", -1, &insert,
                     nullptr);
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    sqlite3_bind_int64(insert, 1, std::int64_t(i));
    bind_text(insert, 2, jobs[i].name);
    bind_text(insert, 3, job_to_json(jobs[i]));
    if (sqlite3_step(insert) != SQLITE_DONE) {
      sqlite3_finalize(insert);
      return fail(journal.sqlite_error("writing"));
    }
    sqlite3_reset(insert);
  }
  sqlite3_finalize(insert);
  if (auto done = journal.exec("COMMIT"); !done) return fail(done.error());
  sqlite3_close(journal.db_);
  journal.db_ = nullptr;
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    const int error = errno;
    ::unlink(temp.c_str());
    return make_error(Errc::state, "cannot create journal " + quote_for_message(path) + ": " + std::strerror(error));
  }
  return open(path, /*read_only=*/false);
}

Result<Journal> Journal::open(const std::string& path, bool read_only) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) {
    return make_error(Errc::bad_input, "no journal at " + quote_for_message(path) + " (" + std::strerror(errno) + ")");
  }
  if (!S_ISREG(info.st_mode)) return make_error(Errc::bad_input, quote_for_message(path) + " is not a journal file");
  auto db = open_database(path, read_only ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE);
  if (!db) return db.error();
  Journal journal(*db, path);
  if (journal.meta("format") != kFormat) {
    return make_error(Errc::bad_input, quote_for_message(path) + " is not a gpuslot batch journal (or it is corrupt)");
  }
  if (!read_only) {
    if (auto done = journal.exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-512"); !done) return done.error();
    const char* sql =
        "UPDATE jobs SET state=?2, attempts=?3, oom_failures=?4, other_failures=?5, gpu_uuids=?6, gpu_indices=?7, "
        "exit_code=?8, signal=?9, reason=?10, tail=?11, started_at=?12, ended_at=?13, not_before=?14, avoid=?15, "
        "slurm_job_id=?16, slurm_node=?17 WHERE seq=?1";
    if (sqlite3_prepare_v2(journal.db_, sql, -1, &journal.update_, nullptr) != SQLITE_OK) {
      return journal.sqlite_error("preparing");
    }
  }
  return journal;
}

std::string Journal::meta(const std::string& key) const {
  sqlite3_stmt* statement = nullptr;
  if (sqlite3_prepare_v2(db_, "SELECT value FROM meta WHERE key=?1", -1, &statement, nullptr) != SQLITE_OK) return "";
  bind_text(statement, 1, key);
  std::string value;
  if (sqlite3_step(statement) == SQLITE_ROW) value = column_text(statement, 0);
  sqlite3_finalize(statement);
  return value;
}

Result<std::vector<JobStatus>> Journal::load(bool with_specs) const {
  sqlite3_stmt* statement = nullptr;
  const char* sql =
      "SELECT seq, name, spec, state, attempts, oom_failures, other_failures, gpu_uuids, gpu_indices, exit_code, "
      "signal, reason, tail, started_at, ended_at, not_before, avoid, slurm_job_id, slurm_node FROM jobs ORDER BY seq";
  if (sqlite3_prepare_v2(db_, sql, -1, &statement, nullptr) != SQLITE_OK) return sqlite_error("reading");
  std::vector<JobStatus> jobs;
  jobs.reserve(std::size_t(std::stoull("0" + meta("jobs"))));  // one allocation, no doubling peak
  int rc = SQLITE_ROW;
  while ((rc = sqlite3_step(statement)) == SQLITE_ROW) {
    JobStatus job;
    job.seq = sqlite3_column_int64(statement, 0);
    auto state = parse_state(column_text(statement, 3));
    Result<JobSpec> spec = JobSpec{};
    if (with_specs) spec = job_from_json(column_text(statement, 2), unsigned(job.seq + 1));
    if (!spec || !state || (with_specs && spec->name != column_text(statement, 1)) || job.seq != std::int64_t(jobs.size())) {
      sqlite3_finalize(statement);
      return make_error(Errc::bad_input, "journal " + quote_for_message(path_) + " is corrupt (job " +
                                             std::to_string(job.seq) + " cannot be read)");
    }
    if (with_specs) job.spec = std::move(*spec);
    else job.spec.name = column_text(statement, 1);
    job.state = *state;
    job.attempts = unsigned(sqlite3_column_int(statement, 4));
    job.oom_failures = unsigned(sqlite3_column_int(statement, 5));
    job.other_failures = unsigned(sqlite3_column_int(statement, 6));
    job.gpu_uuids = split(column_text(statement, 7));
    for (const auto& index : split(column_text(statement, 8))) job.gpu_indices.push_back(unsigned(std::stoul(index)));
    job.exit_code = column_optional<int>(statement, 9);
    job.signal = column_optional<int>(statement, 10);
    job.reason = column_text(statement, 11);
    job.tail = column_text(statement, 12);
    job.started_at = column_optional<double>(statement, 13);
    job.ended_at = column_optional<double>(statement, 14);
    job.not_before = column_optional<double>(statement, 15);
    job.avoid_uuids = split(column_text(statement, 16));
    job.slurm_job_id = column_text(statement, 17);
    job.slurm_node = column_text(statement, 18);
    jobs.push_back(std::move(job));
  }
  sqlite3_finalize(statement);
  if (rc != SQLITE_DONE) return sqlite_error("reading");
  return jobs;
}

Result<void> Journal::save(const std::vector<const JobStatus*>& jobs) {
  if (jobs.empty()) return {};
  if (auto done = exec("BEGIN IMMEDIATE"); !done) return done;
  for (const JobStatus* job : jobs) {
    std::vector<std::string> indices;
    for (unsigned index : job->gpu_indices) indices.push_back(std::to_string(index));
    sqlite3_bind_int64(update_, 1, job->seq);
    bind_text(update_, 2, job_state_name(job->state));
    sqlite3_bind_int(update_, 3, int(job->attempts));
    sqlite3_bind_int(update_, 4, int(job->oom_failures));
    sqlite3_bind_int(update_, 5, int(job->other_failures));
    bind_text(update_, 6, join(job->gpu_uuids));
    bind_text(update_, 7, join(indices));
    bind_optional(update_, 8, job->exit_code);
    bind_optional(update_, 9, job->signal);
    bind_text(update_, 10, job->reason);
    bind_text(update_, 11, job->tail);
    bind_optional(update_, 12, job->started_at);
    bind_optional(update_, 13, job->ended_at);
    bind_optional(update_, 14, job->not_before);
    bind_text(update_, 15, join(job->avoid_uuids));
    bind_text(update_, 16, job->slurm_job_id);
    bind_text(update_, 17, job->slurm_node);
    const int rc = sqlite3_step(update_);
    sqlite3_reset(update_);
    if (rc != SQLITE_DONE) {
      Error error = sqlite_error("writing");
      (void)exec("ROLLBACK");
      return error;
    }
  }
  return exec("COMMIT");
}


const char* executor_name(BatchExecutor executor) noexcept {
  return executor == BatchExecutor::slurm ? "slurm" : "local";
}

namespace {

// Random, so that Slurm job names of two batches never collide, even for the same journal path
// made twice (a stale job of the first must never be taken for one of the second).
std::string new_batch_id() {
  std::random_device source;
  char text[9];
  std::snprintf(text, sizeof text, "%08x", unsigned(source()));
  return text;
}

// Checks the journal's jobs against the jobs file's and resolves `after` and groups.
Result<void> index_jobs(OpenedBatch& batch, const std::vector<std::string>& names, std::size_t expected,
                        const std::string& journal_path) {
  auto& jobs = batch.jobs;
  if (jobs.size() != expected) {
    return make_error(Errc::bad_input, "journal " + quote_for_message(journal_path) + " holds " + std::to_string(jobs.size()) +
                                           " jobs, the jobs file " + std::to_string(expected));
  }
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (jobs[i].spec.name != names[i]) {
      return make_error(Errc::bad_input, "journal " + quote_for_message(journal_path) + " names job " + std::to_string(i + 1) +
                                             " " + quote_for_message(jobs[i].spec.name) + ", the jobs file " +
                                             quote_for_message(names[i]));
    }
  }
  // `after` by index. The name index is one contiguous array, freed (and given back) at once.
  std::vector<std::pair<std::string_view, std::uint32_t>> by_name;
  by_name.reserve(jobs.size());
  for (std::size_t i = 0; i < jobs.size(); ++i) by_name.emplace_back(jobs[i].spec.name, std::uint32_t(i));
  std::sort(by_name.begin(), by_name.end());
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    for (const auto& name : jobs[i].spec.after) {
      auto it = std::lower_bound(by_name.begin(), by_name.end(), std::make_pair(std::string_view(name), std::uint32_t(0)));
      if (it == by_name.end() || it->first != name) {
        return make_error(Errc::bad_input, "job " + quote_for_message(jobs[i].spec.name) + " waits for unknown job " + quote_for_message(name));
      }
      batch.after[i].push_back(it->second);
    }
  }
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    if (!jobs[i].spec.group.empty()) batch.groups[jobs[i].spec.group].push_back(i);
  }
  return {};
}

// True when `logs_dir` holds nothing but the scheduler lock: what a start leaves when it is
// stopped (kill -9, a full disk) after making the folder and before its journal existed. Any
// other file there belongs to a batch that ran.
bool holds_only_the_scheduler_lock(const std::string& logs_dir) {
  DIR* directory = ::opendir(logs_dir.c_str());
  if (directory == nullptr) return false;
  bool only_lock = true;
  while (const dirent* entry = ::readdir(directory)) {
    const std::string name = entry->d_name;
    if (name != "." && name != ".." && name != "scheduler.lock") only_lock = false;
  }
  ::closedir(directory);
  return only_lock;
}

// The order queued jobs are offered room: the flag when given, else what the journal recorded
// when the batch started (so a resumed batch keeps its order), else largest first.
JobOrder order_of(const BatchOptions& options, const std::string& recorded) {
  if (options.order) return *options.order;
  return recorded == "file" ? JobOrder::file : JobOrder::largest_first;
}

// `logs_existed`: the logs folder was there before this start. --resume without a journal starts
// the batch afresh only when that folder holds nothing but the scheduler lock: a start stopped
// before its journal existed, so nothing of that batch ran. Anything else (a journal moved away,
// a mistyped --journal that shares the logs folder of another) is refused.
Result<void> open_or_create(OpenedBatch& batch, const std::vector<JobSpec>& specs, const BatchOptions& options,
                            bool logs_existed) {
  const std::string executor = executor_name(options.executor);
  struct stat journal_info {};
  const bool no_journal = ::lstat(options.journal_path.c_str(), &journal_info) != 0 && errno == ENOENT;
  if (options.resume && no_journal && !(logs_existed && holds_only_the_scheduler_lock(batch.logs_dir))) {
    return make_error(Errc::bad_input, "no journal at " + quote_for_message(options.journal_path) + ", but its logs folder " +
                                           quote_for_message(batch.logs_dir) +
                                           " holds files of a batch that ran; nothing to resume (pass the journal that "
                                           "batch wrote, or --journal NEW without --resume to start afresh)");
  }
  if (!options.resume || no_journal) {
    const double created_at = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    batch.order = order_of(options, "");
    auto created = Journal::create(options.journal_path, specs, options.jobs_source, options.jobs_hash,
                                   {{"executor", executor}, {"batch_id", new_batch_id()},
                                    {"created_at", std::to_string(std::int64_t(created_at))},
                                    {"order", batch.order == JobOrder::file ? "file" : "largest-first"}});
    if (!created) return created.error();
    batch.journal.emplace(std::move(*created));
    return {};
  }
  auto opened = Journal::open(options.journal_path, /*read_only=*/false);
  if (!opened) return opened.error();
  batch.journal.emplace(std::move(*opened));
  batch.order = order_of(options, batch.journal->meta("order"));
  if (batch.journal->meta("jobs_hash") != std::to_string(options.jobs_hash)) {
    return make_error(Errc::bad_input, "the jobs file differs from the one journal " + quote_for_message(options.journal_path) +
                                           " was made from; resume with the same file, or start a new journal");
  }
  std::string made_for = batch.journal->meta("executor");
  if (made_for.empty()) made_for = "local";
  if (made_for != executor) {
    return make_error(Errc::bad_input, "journal " + quote_for_message(options.journal_path) + " is a batch run with --executor " +
                                           made_for + "; resume it with --executor " + made_for);
  }
  return {};
}

}  // namespace

Result<OpenedBatch> open_batch_journal(std::vector<JobSpec> specs, const BatchOptions& options) {
  OpenedBatch batch;
  batch.logs_dir = logs_directory_of(options.journal_path);
  struct stat info {};
  if (options.resume && ::lstat(options.journal_path.c_str(), &info) != 0 && ::lstat(batch.logs_dir.c_str(), &info) != 0) {
    // Neither journal nor logs folder: no batch ever started here (a mistyped path?). Leave no
    // folder behind, or the next --resume would take it for a start stopped before its journal.
    return make_error(Errc::bad_input, "no journal at " + quote_for_message(options.journal_path) +
                                           "; nothing to resume (run without --resume to start)");
  }
  bool logs_existed = false;
  if (::mkdir(batch.logs_dir.c_str(), 0755) != 0) {
    logs_existed = errno == EEXIST;
    if (!logs_existed) {
      return make_error(Errc::state, "cannot create the logs folder " + quote_for_message(batch.logs_dir) + ": " +
                                         std::strerror(errno));
    }
  }
  // One scheduler per journal. A classic POSIX record lock on a file of its own (not the
  // database, whose locks SQLite owns): unlike flock, it belongs to the process and is not
  // inherited by a forked shepherd, so it is free the instant the scheduler dies, even while a
  // just-forked shepherd has not yet run.
  const std::string lock_path = batch.logs_dir + "/scheduler.lock";
  batch.lock_fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (batch.lock_fd < 0) {
    return make_error(Errc::state, "cannot open " + quote_for_message(lock_path) + ": " + std::strerror(errno));
  }
  auto fail = [&batch](Error error) -> Result<OpenedBatch> {
    ::close(batch.lock_fd);
    return error;
  };
  struct flock whole {};
  whole.l_type = F_WRLCK;
  whole.l_whence = SEEK_SET;
  if (::fcntl(batch.lock_fd, F_SETLK, &whole) != 0) {
    return fail(make_error(Errc::state, "journal " + quote_for_message(options.journal_path) +
                                            " is in use by another gpuslot batch (wait for it, or stop it first)"));
  }
  if (auto opened = open_or_create(batch, specs, options, logs_existed); !opened) return fail(opened.error());
  // The jobs file's specs are now in the journal: free them before loading the journal's
  // records, so 100 000 jobs are never held twice (issue target: < 64 MiB). On --resume the
  // journal's jobs are the file's (same hash).
  const std::size_t expected = specs.size();
  std::vector<std::string> names;
  if (options.resume) {
    names.reserve(expected);
    for (auto& spec : specs) names.push_back(std::move(spec.name));
  }
  std::vector<JobSpec>().swap(specs);
  ::malloc_trim(0);  // the parse's free holes go back before the records are allocated
  auto loaded = batch.journal->load(/*with_specs=*/true);
  if (!loaded) return fail(loaded.error());
  batch.jobs = std::move(*loaded);
  if (auto indexed = index_jobs(batch, names, expected, options.journal_path); !indexed) return fail(indexed.error());
  // Parsing 100 000 JSON lines leaves the heap full of small free holes: give whole free pages
  // back now, before the scheduler settles in for hours.
  ::malloc_trim(0);
  return batch;
}

}  // namespace gpuslot::jobs_internal

namespace gpuslot {

Result<std::vector<JobStatus>> read_journal(const std::string& path) {
  auto journal = jobs_internal::Journal::open(path, /*read_only=*/true);
  if (!journal) return journal.error();
  return journal->load();
}

}  // namespace gpuslot
