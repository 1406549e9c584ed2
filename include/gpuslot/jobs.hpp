// gpuslot/jobs.hpp — `gpuslot batch`: a durable queue of jobs placed on GPUs by memory.
//
// A batch is a list of jobs (a jobs file: one shell command per line, or JSON Lines). Each job is
// placed through the same host-wide lease ledger as `gpuslot run`, so batch jobs, `run` launches
// and other users share one truth. A job that fails with a GPU out-of-memory error is put back in
// the queue and tried on another GPU first; related jobs (`group`) share a GPU; `after` waits for
// named jobs to succeed.
//
// Durability: every transition is committed to an SQLite journal (WAL) before it takes effect.
// Each job runs under a small forked "shepherd" process that holds the job's lease, waits for the
// job and writes its exit status to a file before it exits. So when the scheduler itself is killed,
// running jobs keep their leases and their results are not lost: `--resume` adopts jobs whose
// shepherd still runs, records the result of those that finished meanwhile, and requeues only
// jobs whose shepherd is gone without a result. Nothing is run twice, nothing is dropped.
//
// The same batch can be sent to Slurm instead (BatchOptions::executor = slurm, run_slurm_batch):
// each attempt of each job is one Slurm job that runs the command under `gpuslot run` on the node
// Slurm picks; the journal, states, retry rules and events are those of local mode.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "gpuslot/error.hpp"
#include "gpuslot/lease.hpp"
#include "gpuslot/policy.hpp"
#include "gpuslot/visibility.hpp"

namespace gpuslot {

// One job as the jobs file describes it.
struct JobSpec {
  std::string name;                  // unique in the batch; default "job-<line>"
  std::string shell;                 // run by /bin/sh -c (when argv is empty)
  std::vector<std::string> argv;     // run directly (JSON "cmd": [...])
  std::uint64_t memory_bytes = 0;    // per GPU
  unsigned gpus = 1;
  std::string group;                 // jobs of one group run on the GPU of the group's first job
  std::vector<std::string> after;    // names that must succeed first
  unsigned oom_retries = 3;          // requeues after a GPU out-of-memory failure
  unsigned failure_retries = 0;      // requeues after any other failure (only if the job says so)
  std::vector<std::pair<std::string, std::string>> env;
  std::string cwd;
  bool exclusive = false;            // the whole GPU: no other process or lease on it
  unsigned line = 0;                 // 1-based line in the jobs file

  // What `gpuslot batch --status` and the logs show as the command.
  std::string display_command() const;
};

struct JobDefaults {
  std::uint64_t memory_bytes = 2ull << 30;
  unsigned gpus = 1;
  unsigned oom_retries = 3;
};

// Parses a jobs file. JSON Lines when the first line that is not blank or a `#` comment starts
// with '{'; otherwise one shell command per line. Everything is checked before anything runs:
// unknown fields, bad sizes, names used twice, unknown or cyclic `after` — Errc::bad_input with
// the line number ("line 7: …").
Result<std::vector<JobSpec>> parse_jobs(std::string_view text, const JobDefaults& defaults);

// The canonical JSON of a job (what the journal stores) and back.
std::string job_to_json(const JobSpec& job);
Result<JobSpec> job_from_json(std::string_view text, unsigned line);

// True when `output` carries one of the GPU out-of-memory signatures of DESIGN.md
// ("CUDA out of memory", "CUDA_ERROR_OUT_OF_MEMORY", "cudaErrorMemoryAllocation", "OutOfMemoryError").
bool looks_like_gpu_oom(std::string_view output);

enum class JobState { queued, running, succeeded, failed };
const char* job_state_name(JobState state) noexcept;

// One job as the journal knows it.
struct JobStatus {
  std::int64_t seq = 0;              // position in the jobs file (0-based)
  JobSpec spec;
  JobState state = JobState::queued;
  unsigned attempts = 0;             // attempts started
  unsigned oom_failures = 0;
  unsigned other_failures = 0;
  std::vector<std::string> gpu_uuids;  // of the latest attempt
  std::vector<unsigned> gpu_indices;
  std::optional<int> exit_code;
  std::optional<int> signal;
  std::string reason;                // why it failed / waits / was requeued
  std::string tail;                  // last lines of output of a failed attempt
  std::optional<double> started_at;  // Unix seconds, latest attempt
  std::optional<double> ended_at;
  std::optional<double> not_before;  // back-off after an out-of-memory failure
  std::vector<std::string> avoid_uuids;  // GPUs where it ran out of memory
  // Slurm executor only: the latest attempt's Slurm job id ("" while not submitted, or while its
  // submission is not yet confirmed) and the node it ran on ("" until it started).
  std::string slurm_job_id;
  std::string slurm_node;
};

// Reads a journal (read-only; safe while a scheduler runs). Errc::bad_input when `path` is not a
// gpuslot journal or is corrupt, Errc::state when it cannot be opened.
Result<std::vector<JobStatus>> read_journal(const std::string& path);

// The logs folder of a journal: "<journal minus .db>.logs".
std::string logs_directory_of(const std::string& journal_path);

enum class BatchExecutor { local, slurm };

// The order in which the local scheduler offers queued jobs the free room. largest_first (the
// default) is first-fit decreasing: jobs needing more GPUs, then whole GPUs (exclusive), then more
// memory go first and smaller jobs fill the gaps they leave, which packs mixed sizes far better
// than file order (bench/README.md, "Batch"). Ties, and jobs of equal size such as the chunks of
// one long job, keep file order; a group goes as one unit, at its largest member's size, its first
// member first. `after` constrains either order. The journal records the order; --resume keeps it.
enum class JobOrder { largest_first, file };

// How a batch is sent to Slurm (BatchExecutor::slurm).
struct SlurmOptions {
  std::string partition;                   // sbatch --partition ("" = the cluster's default)
  std::string account;                     // sbatch --account
  std::vector<std::string> sbatch_args;    // appended after gpuslot's own sbatch options
  std::chrono::milliseconds poll_interval{10'000};  // between squeue calls
  std::chrono::milliseconds gpu_wait{60'000};  // how long a started job waits for room on its GPUs
  std::string gpuslot_path;                // absolute path of the gpuslot binary the jobs run under
};

struct BatchOptions {
  BatchExecutor executor = BatchExecutor::local;
  SlurmOptions slurm;
  std::string journal_path;
  bool resume = false;
  std::string jobs_source;           // the jobs file as given ("-" for stdin), recorded
  std::uint64_t jobs_hash = 0;       // of its text: --resume refuses a changed file
  Strategy strategy = Strategy::pack;
  std::optional<JobOrder> order;     // unset: what the journal recorded, else largest_first
  std::vector<std::string> exclude;
  ExportFormat export_format = ExportFormat::index;
  std::vector<int> oom_exit_codes;   // exit codes that mean out of memory (--oom-exit-code)
  unsigned max_running = 0;          // 0: as many as fit
  std::chrono::milliseconds poll_interval{250};  // memory freed outside gpuslot
  std::chrono::milliseconds oom_backoff{500};    // before a retry; doubled per further failure of the job
};

// What the scheduler reports as it goes (the CLI prints it).
struct BatchEvent {
  enum class Kind { started, adopted, succeeded, failed, oom_requeued, failure_requeued, lost_requeued,
                    never_fits, dependency_failed, interrupted,
                    submitted };  // Slurm: sbatch accepted the attempt (JobStatus::slurm_job_id)
  Kind kind;
  const JobStatus* job;
  std::string detail;
};

struct GpuOccupancy {
  unsigned nvml_index = 0;
  unsigned jobs = 0;
  std::uint64_t reserved_bytes = 0;   // by this batch's jobs
};

struct BatchProgress {
  std::size_t total = 0, succeeded = 0, failed = 0, running = 0, waiting = 0;
  std::vector<GpuOccupancy> gpus;
  std::string waiting_reason;        // why the first waiting job waits
};

class BatchObserver {
 public:
  virtual ~BatchObserver() = default;
  virtual void on_event(const BatchEvent& /*event*/) {}
  virtual void on_progress(const BatchProgress& /*progress*/) {}
};

struct BatchResult {
  std::vector<JobStatus> jobs;
  bool interrupted = false;          // stopped by SIGINT/SIGTERM/SIGHUP; --resume continues
  bool all_succeeded() const;
};

// Runs a batch to the end (or to an interrupting signal, which is forwarded to running jobs).
// With `resume`, continues the journal (whose jobs must equal `jobs`); without, the journal must
// not exist yet. Errc::bad_input for a mismatched or corrupt journal, Errc::state for one in use
// by another scheduler or unwritable.
// `jobs` is taken by value: the scheduler keeps one copy of each job (100 000 jobs fit in
// well under 64 MiB).
// With options.executor == slurm it runs run_slurm_batch (the ledger and snapshots are unused).
Result<BatchResult> run_batch(std::vector<JobSpec> jobs, const BatchOptions& options, Ledger& ledger,
                              const SnapshotSource& snapshot_source, const VisibilityOf& visibility_of,
                              BatchObserver& observer);

// Runs a batch through Slurm (options.slurm): every attempt is one `sbatch` job running
// `gpuslot run --mem M --gpus N --wait T -- CMD` on the node Slurm chose; `after` becomes
// --dependency=afterok, a group's later jobs go to the node of its first. Watches with squeue
// (scontrol/sacct for ended jobs); ends when every job has, or at an interrupting signal, which
// stops submitting and leaves submitted jobs to Slurm (--resume reconciles, submitting nothing
// twice). Needs no GPU and no NVML on the submitting host. Errc::bad_input when Slurm's commands
// are missing or sbatch refuses the batch's own options (a bad --partition, --sbatch-arg).
Result<BatchResult> run_slurm_batch(std::vector<JobSpec> jobs, const BatchOptions& options, BatchObserver& observer);

}  // namespace gpuslot
