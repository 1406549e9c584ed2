// jobs/journal.hpp — the batch's durable journal: one SQLite database in WAL mode.
//
// Every transition of a job is written here and committed before it takes effect (before the
// job is started, before its files are cleaned up). synchronous=NORMAL: a commit survives the
// scheduler being killed at any instant (the WAL is in the kernel's page cache); only a power
// loss can lose the latest commits, which would at worst run a job again.
#pragma once

#include <sqlite3.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "gpuslot/jobs.hpp"

namespace gpuslot::jobs_internal {

class Journal {
 public:
  // A new journal holding `jobs` as queued, with `extra_meta` beside the standard keys.
  // Errc::state if it exists or cannot be written.
  static Result<Journal> create(const std::string& path, const std::vector<JobSpec>& jobs,
                                const std::string& source, std::uint64_t jobs_hash,
                                const std::vector<std::pair<std::string, std::string>>& extra_meta = {});
  // An existing journal. Errc::bad_input if it is not a gpuslot journal.
  static Result<Journal> open(const std::string& path, bool read_only);

  Journal(Journal&& other) noexcept;
  Journal& operator=(Journal&&) = delete;
  ~Journal();

  std::string meta(const std::string& key) const;  // "" when absent
  // Every job in file order. Without `with_specs` the stored job specs are not parsed (the
  // scheduler has them from the jobs file, which --resume checks against the journal's hash).
  Result<std::vector<JobStatus>> load(bool with_specs = true) const;

  // Writes the mutable columns of `jobs` in one transaction.
  Result<void> save(const std::vector<const JobStatus*>& jobs);
  Result<void> save(const JobStatus& job) { return save(std::vector<const JobStatus*>{&job}); }

 private:
  explicit Journal(sqlite3* db, std::string path) : db_(db), path_(std::move(path)) {}
  Result<void> exec(const char* sql) const;
  Error sqlite_error(const std::string& what) const;
  sqlite3* db_ = nullptr;
  sqlite3_stmt* update_ = nullptr;
  std::string path_;
};

// A batch's journal as a scheduler (local or Slurm) works on it: the scheduler lock held, the
// journal created (or, with options.resume, reopened and checked against the jobs file and the
// executor it was made for) and its jobs loaded, with `after` resolved to indices.
struct OpenedBatch {
  std::optional<Journal> journal;
  std::vector<JobStatus> jobs;
  std::unordered_map<std::size_t, std::vector<std::uint32_t>> after;  // jobs with `after`: what they wait for
  std::map<std::string, std::vector<std::size_t>> groups;             // members in file order
  std::string logs_dir;
  int lock_fd = -1;  // the scheduler lock (<logs>/scheduler.lock); the caller closes it when done
  JobOrder order = JobOrder::largest_first;  // BatchOptions::order, else the journal's
};

// `specs` are freed once they are in the journal, before the journal's records are loaded, so
// 100 000 jobs are never held twice. Errc::state when another scheduler holds the journal or it
// cannot be written; Errc::bad_input when it does not match the jobs file or the executor.
Result<OpenedBatch> open_batch_journal(std::vector<JobSpec> specs, const BatchOptions& options);

// The executor a journal was made for ("local" for journals that do not say).
const char* executor_name(BatchExecutor executor) noexcept;

}  // namespace gpuslot::jobs_internal
