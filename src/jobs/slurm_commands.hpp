// jobs/slurm_commands.hpp — talking to Slurm through its own commands (sbatch, squeue, scontrol,
// sacct, scancel), and the batch script each attempt runs.
//
// Why the commands and not a library: libslurm's API changes with every release and must match
// the cluster's version exactly, while the commands' machine-readable forms (`sbatch --parsable`,
// `squeue -o`, `scontrol -o`, `sacct -P`) have been stable for a decade and are what every
// workflow tool (Snakemake, Nextflow, submitit) drives. Everything that parses their output or
// builds their command lines is a pure function here, so it is unit-tested without a cluster.
#pragma once

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gpuslot/jobs.hpp"
#include "jobs/retry_rules.hpp"
#include "jobs/shepherd.hpp"

namespace gpuslot::jobs_internal {

// --- running a command ----------------------------------------------------------------------------

struct CommandOutput {
  int exit_code = 0;          // 128+N when killed by signal N
  std::optional<int> signal;  // it was killed by this signal (also after a time-out)
  bool timed_out = false;
  std::string out, err;
};

// Runs `argv` (PATH searched) with the caller's environment, in a process group of its own (a
// Ctrl-C at the terminal must not kill an sbatch half-way), capturing its output; killed after
// `timeout`. `keep_fd` (>= 0) stays open in the child: the submission lock (see slurm_executor).
// Errc::state when it cannot be started.
Result<CommandOutput> run_command(const std::vector<std::string>& argv, std::chrono::milliseconds timeout,
                                  int keep_fd = -1);

// True when `program` is an executable file on PATH.
bool on_path(const std::string& program);

// --- names and scripts ----------------------------------------------------------------------------

// The Slurm job name of one attempt: "<job>.<attempt>.gpuslot-<batch id>". The job's own name
// comes first because squeue shows only the first 8 characters by default; the batch id makes it
// unique, so --resume can find an attempt whose id was never recorded by its name.
std::string slurm_job_name(const std::string& batch_id, const std::string& job_name, unsigned attempt);

// `text` as one word for /bin/sh: single-quoted, ' written as '\''.
std::string shell_quote(std::string_view text);

// Slurm expands %j, %x… in --output paths; "%%" is a literal %.
std::string escape_slurm_filename(std::string_view path);

struct ScriptInput {
  const JobSpec* job = nullptr;
  unsigned attempt = 0;
  std::string journal;       // absolute, for the header comment
  std::string run_path;      // where the script appends "start …", "exit N", "end …"
  std::string cwd;           // absolute
  std::string gpuslot_path;  // absolute
  std::chrono::milliseconds gpu_wait{0};
  ExportFormat export_format = ExportFormat::index;
};

// The /bin/sh batch script of one attempt: it records its start (time, Slurm job id, node,
// SLURM_JOB_GPUS) in the run file, changes to the job's directory, runs the command under
// `gpuslot run --mem M --gpus N --wait T` with the job's environment (plus GPUSLOT_JOB_NAME and
// GPUSLOT_JOB_ATTEMPT), and appends "exit N" and the end time.
std::string batch_script(const ScriptInput& input);

struct SbatchInput {
  std::string job_name;
  std::string comment;
  std::string out_path, err_path;  // absolute
  unsigned gpus = 1;
  std::vector<std::string> afterok;  // Slurm job ids that must complete successfully first
  std::string nodelist;              // "" = anywhere
  const SlurmOptions* options = nullptr;
  std::string script_path;
};

// sbatch's command line: --parsable, one node, one task, --gres=gpu:N, the job name and comment,
// --output/--error, --kill-on-invalid-dep=no (a failed dependency is resubmitted by gpuslot, and
// its dependants repointed, rather than cancelled by Slurm), --dependency=afterok:…, --nodelist,
// --partition, --account, then the user's --sbatch-arg options (so theirs win), then the script.
std::vector<std::string> sbatch_command(const SbatchInput& input);

// --- parsing ------------------------------------------------------------------------------------

// The job id `sbatch --parsable` printed ("123" or "123;cluster"); nullopt when there is none.
std::optional<std::string> parse_sbatch_id(std::string_view out);

enum class SbatchRefusal {
  uncertain,   // no clear answer (controller unreachable, time-out, submit limit): look it up by name
  never_fits,  // the job asks what no node has (too many GPUs, unknown GRES)
  refused,     // the batch's own options are wrong (partition, account, --sbatch-arg): stop the batch
};
SbatchRefusal classify_sbatch_failure(const CommandOutput& result);

// The squeue format the executor asks for, and one row of it.
inline constexpr const char* kSqueueFormat = "%i|%j|%T|%N|%r";
struct SlurmJobRow {
  std::string id, name, state, node, reason;
};
// Rows of `squeue -h -o kSqueueFormat`; the name (which may hold '|') is what lies between the
// first field and the last three. Malformed lines are skipped.
std::vector<SlurmJobRow> parse_squeue(std::string_view out);

// `scontrol show job -o ID`: Key=Value fields (a value may hold spaces, e.g. a Command's arguments).
std::map<std::string, std::string> parse_scontrol_fields(std::string_view line);

// Rows of `sacct -n -X -P -o JobID,JobName,State,ExitCode,NodeList`, as squeue rows with the exit
// code ("N:S") in `reason`. The state's trailing words ("CANCELLED by 1000") are dropped.
std::vector<SlurmJobRow> parse_sacct(std::string_view out);

// Slurm's "ExitCode=N:S": exit status N, or killed by signal S (when S > 0).
struct SlurmExit {
  std::optional<int> exit_code;
  std::optional<int> signal;
};
SlurmExit parse_slurm_exit_code(std::string_view text);

// True for job states after which the job will not run again (COMPLETED, FAILED, CANCELLED,
// TIMEOUT, NODE_FAIL, PREEMPTED, BOOT_FAIL, DEADLINE, OUT_OF_MEMORY, REVOKED). Anything else —
// PENDING, RUNNING, COMPLETING, SUSPENDED, REQUEUED… or a state a newer Slurm adds — is waited on.
bool slurm_state_is_final(std::string_view state);
// True for states in which the job holds its node (RUNNING, COMPLETING, CONFIGURING, …).
bool slurm_state_is_running(std::string_view state);

// What the batch script wrote into the run file.
struct ScriptRecord {
  std::optional<double> started_at, ended_at;
  std::string slurm_job_id, node;
  std::vector<unsigned> gpus;  // SLURM_JOB_GPUS
};
ScriptRecord parse_script_record(std::string_view run_file);

// How an attempt ended, from what its script recorded (`script`: the run file's "exit N" /
// "error N …"), else from Slurm's final state (`final_row`, from squeue or sacct) and ExitCode:
// COMPLETED is exit 0; any other final state is a failure described as "ended by Slurm: STATE"
// (OUT_OF_MEMORY named as host memory). nullopt when neither says anything: the attempt left no
// result. Output and tail are left to the caller (read_attempt_output).
std::optional<AttemptEnd> slurm_attempt_end(const std::optional<AttemptOutcome>& script,
                                            const std::optional<SlurmJobRow>& final_row, const SlurmExit& slurm_exit);

// True when `output` holds what `gpuslot run` prints when the GPUs it was given lack room for its
// --mem (after --wait T, or at once without --wait): for a Slurm job, an out-of-memory failure.
bool gpuslot_run_found_no_room(std::string_view output);

// The first non-blank line of `text`, tabs and CRs as spaces.
std::string first_line(std::string_view text);

// sbatch's first line of complaint without its "sbatch: error: " and "Batch job submission
// failed: " prefixes.
std::string sbatch_message(const CommandOutput& result);

// "YYYY-MM-DDTHH:MM:SS" in local time, as sacct's --starttime takes it.
std::string slurm_time(double unix_seconds);

}  // namespace gpuslot::jobs_internal
