// Unit tests of the Slurm executor's pure parts (jobs/slurm_commands.hpp): what sbatch, squeue,
// scontrol and sacct print (captured from Slurm 22.05.8), sbatch's command line, the batch script
// (run for real through /bin/sh with a stand-in for gpuslot), and the journal's Slurm columns.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "gpuslot/jobs.hpp"
#include "jobs/journal.hpp"
#include "jobs/retry_rules.hpp"
#include "jobs/slurm_commands.hpp"

namespace gpuslot {
namespace {

using namespace jobs_internal;

std::filesystem::path fresh_folder(const std::string& name) {
  const auto folder = std::filesystem::temp_directory_path() / ("gpuslot-" + name + "-" + std::to_string(::getpid()));
  std::filesystem::remove_all(folder);
  std::filesystem::create_directories(folder);
  return folder;
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream stream(path);
  std::stringstream text;
  text << stream.rdbuf();
  return text.str();
}

TEST(SlurmParse, SbatchParsableId) {
  EXPECT_EQ(parse_sbatch_id("123\n"), "123");
  EXPECT_EQ(parse_sbatch_id("4567;cluster-a\n"), "4567");
  // Warnings may come first on stdout with some site plugins.
  EXPECT_EQ(parse_sbatch_id("sbatch: warning: no time limit given\n89\n"), "89");
  EXPECT_FALSE(parse_sbatch_id(""));
  EXPECT_FALSE(parse_sbatch_id("Submitted batch job 12\n"));  // not --parsable: refuse to guess
}

TEST(SlurmParse, SqueueRowsKeepNamesWithBars) {
  const auto rows = parse_squeue(
      "10|a.1.gpuslot-0badf00d|RUNNING|node7|None\n"
      "11|odd|name|PENDING||Dependency\n"
      "garbage\n"
      "12|c.1.gpuslot-0badf00d|PENDING||DependencyNeverSatisfied\r\n");
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0].id, "10");
  EXPECT_EQ(rows[0].name, "a.1.gpuslot-0badf00d");
  EXPECT_EQ(rows[0].state, "RUNNING");
  EXPECT_EQ(rows[0].node, "node7");
  EXPECT_EQ(rows[0].reason, "None");
  EXPECT_EQ(rows[1].name, "odd|name");
  EXPECT_EQ(rows[1].node, "");
  EXPECT_EQ(rows[2].reason, "DependencyNeverSatisfied");
  EXPECT_TRUE(parse_squeue("").empty());
}

TEST(SlurmParse, ScontrolOneLiner) {
  const auto fields = parse_scontrol_fields(
      "JobId=1 JobName=gs-abc-1-a UserId=root(0) GroupId=root(0) MCS_label=N/A JobState=FAILED Reason=NonZeroExitCode "
      "Dependency=(null) ExitCode=3:0 AllocNode:Sid=localhost:23020 NodeList=localhost CPUs/Task=1 "
      "Command=/bin/prog --flag x=1 WorkDir=/tmp/sx TresPerNode=gres:gpu:1");
  EXPECT_EQ(fields.at("JobState"), "FAILED");
  EXPECT_EQ(fields.at("ExitCode"), "3:0");
  EXPECT_EQ(fields.at("AllocNode:Sid"), "localhost:23020");
  EXPECT_EQ(fields.at("CPUs/Task"), "1");
  EXPECT_EQ(fields.at("Command"), "/bin/prog --flag x=1");  // a value's own words stay in it
  EXPECT_EQ(fields.at("WorkDir"), "/tmp/sx");
  EXPECT_TRUE(parse_scontrol_fields("slurm_load_jobs error: Invalid job id specified").empty());
}

TEST(SlurmParse, SacctRows) {
  const auto rows = parse_sacct("5|train.2.gpuslot-1|CANCELLED by 1000|0:15|node3\n6|x|COMPLETED|0:0|node1\n");
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].id, "5");
  EXPECT_EQ(rows[0].state, "CANCELLED");
  EXPECT_EQ(rows[0].reason, "0:15");  // the exit code travels in `reason`
  EXPECT_EQ(rows[0].node, "node3");
}

TEST(SlurmParse, ExitCodes) {
  EXPECT_EQ(parse_slurm_exit_code("3:0").exit_code, 3);
  EXPECT_FALSE(parse_slurm_exit_code("3:0").signal);
  EXPECT_EQ(parse_slurm_exit_code("0:15").signal, 15);
  EXPECT_FALSE(parse_slurm_exit_code("0:15").exit_code);
  EXPECT_EQ(parse_slurm_exit_code("0:0").exit_code, 0);
  EXPECT_FALSE(parse_slurm_exit_code("").exit_code);
  EXPECT_FALSE(parse_slurm_exit_code("n/a").exit_code);
}

TEST(SlurmParse, States) {
  for (const char* state : {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}) {
    EXPECT_TRUE(slurm_state_is_final(state)) << state;
  }
  // Waited on, including states a newer Slurm might add.
  for (const char* state : {"PENDING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "SOMETHING_NEW"}) {
    EXPECT_FALSE(slurm_state_is_final(state)) << state;
  }
  EXPECT_TRUE(slurm_state_is_running("RUNNING"));
  EXPECT_TRUE(slurm_state_is_running("COMPLETING"));
  EXPECT_FALSE(slurm_state_is_running("PENDING"));
}

TEST(SlurmParse, SbatchFailures) {
  auto failure = [](const char* err, int code = 1, bool timed_out = false) {
    CommandOutput output;
    output.exit_code = code;
    output.err = err;
    output.timed_out = timed_out;
    if (timed_out) output.signal = 9;
    return classify_sbatch_failure(output);
  };
  EXPECT_EQ(failure("sbatch: error: Batch job submission failed: Requested node configuration is not available\n"),
            SbatchRefusal::never_fits);
  EXPECT_EQ(failure("sbatch: error: Batch job submission failed: Invalid generic resource (gres) specification\n"),
            SbatchRefusal::never_fits);
  EXPECT_EQ(failure("sbatch: error: invalid partition specified: nope\n"
                    "sbatch: error: Batch job submission failed: Invalid partition name specified\n"),
            SbatchRefusal::refused);
  EXPECT_EQ(failure("sbatch: unrecognized option '--bogus'\n", 255), SbatchRefusal::refused);
  // The controller may have taken these jobs even though sbatch saw no reply.
  EXPECT_EQ(failure("sbatch: error: Batch job submission failed: Socket timed out on send/recv operation\n"),
            SbatchRefusal::uncertain);
  EXPECT_EQ(failure("sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)\n"),
            SbatchRefusal::uncertain);
  EXPECT_EQ(failure("sbatch: error: QOSMaxSubmitJobPerUserLimit\nsbatch: error: Batch job submission failed: "
                    "Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)\n"),
            SbatchRefusal::uncertain);
  EXPECT_EQ(failure("", 137, true), SbatchRefusal::uncertain);
}

TEST(SlurmParse, SbatchMessageWithoutPrefixes) {
  CommandOutput output;
  output.err = "\nsbatch: error: invalid partition specified: nope\nsbatch: error: Batch job submission failed: x\n";
  EXPECT_EQ(sbatch_message(output), "invalid partition specified: nope");
  output.err = "sbatch: error: Batch job submission failed: Requested node configuration is not available\n";
  EXPECT_EQ(sbatch_message(output), "Requested node configuration is not available");
  output.err = "sbatch: unrecognized option '--bogus'\nTry \"sbatch --help\"\n";
  EXPECT_EQ(sbatch_message(output), "unrecognized option '--bogus'");
}

TEST(SlurmOutcome, TheScriptsRecordFirstThenSlurmsState) {
  SlurmJobRow failed{"5", "a.1.gpuslot-x", "FAILED", "n1", "NonZeroExitCode"};
  // What the script recorded wins: it is the command's own status.
  AttemptOutcome script;
  script.exit_code = 4;
  auto end = slurm_attempt_end(script, failed, SlurmExit{});
  ASSERT_TRUE(end);
  EXPECT_EQ(end->exit_code, 4);
  EXPECT_TRUE(end->how.empty());
  // Without it, Slurm's state and ExitCode.
  end = slurm_attempt_end(std::nullopt, SlurmJobRow{"5", "x", "COMPLETED", "n1", "None"}, SlurmExit{});
  ASSERT_TRUE(end);
  EXPECT_EQ(end->exit_code, 0);
  end = slurm_attempt_end(std::nullopt, SlurmJobRow{"5", "x", "TIMEOUT", "n1", "TimeLimit"}, parse_slurm_exit_code("0:15"));
  ASSERT_TRUE(end);
  EXPECT_EQ(end->signal, 15);
  EXPECT_EQ(end->how, "ended by Slurm: TIMEOUT (TimeLimit)");
  end = slurm_attempt_end(std::nullopt, SlurmJobRow{"5", "x", "OUT_OF_MEMORY", "n1", "None"}, parse_slurm_exit_code("0:9"));
  ASSERT_TRUE(end);
  EXPECT_NE(end->how.find("host memory, not GPU memory"), std::string::npos);
  // A job cancelled while pending never ran: no exit status, so never a success.
  end = slurm_attempt_end(std::nullopt, SlurmJobRow{"5", "x", "CANCELLED", "", "Dependency"}, parse_slurm_exit_code("0:0"));
  ASSERT_TRUE(end);
  EXPECT_EQ(end->how, "ended by Slurm: CANCELLED");
  EXPECT_FALSE(end->exit_code);
  JobStatus job;
  EXPECT_EQ(settle_attempt(job, *end, BatchOptions{}, "", ""), BatchEvent::Kind::failed);
  EXPECT_EQ(job.reason, "failed (ended by Slurm: CANCELLED)");
  // Nothing anywhere: no result.
  EXPECT_FALSE(slurm_attempt_end(std::nullopt, std::nullopt, SlurmExit{}));
}

TEST(SlurmOutcome, NoRoomOnTheGrantedGpuIsRecognised) {
  EXPECT_TRUE(gpuslot_run_found_no_room("gpuslot: timed out waiting for room: GPU 0: 0.56 GiB available, 8 GiB asked\n"));
  EXPECT_TRUE(gpuslot_run_found_no_room("gpuslot: no GPU has 8 GiB available now (add --wait to wait for room)\n"));
  EXPECT_FALSE(gpuslot_run_found_no_room("Traceback: ValueError\n"));
}

TEST(SlurmNames, JobNameQuotingAndFileNames) {
  EXPECT_EQ(slurm_job_name("0badf00d", "chunk-1", 2), "chunk-1.2.gpuslot-0badf00d");
  EXPECT_EQ(shell_quote("it's $HOME"), "'it'\\''s $HOME'");
  EXPECT_EQ(shell_quote(""), "''");
  EXPECT_EQ(escape_slurm_filename("/data/100%/x.%j.out"), "/data/100%%/x.%%j.out");
}

TEST(SlurmSbatch, CommandLine) {
  SlurmOptions options;
  options.partition = "gpu";
  options.account = "lab";
  options.sbatch_args = {"--time=1:00:00", "--gres=gpu:a100:2"};
  SbatchInput input;
  input.job_name = "a.1.gpuslot-x";
  input.comment = "gpuslot batch x: job a, attempt 1";
  input.out_path = "/logs/50%.out";
  input.err_path = "/logs/a.1.err";
  input.gpus = 2;
  input.afterok = {"10", "11"};
  input.nodelist = "node7";
  input.options = &options;
  input.script_path = "/logs/a.1.sh";
  const std::vector<std::string> expected = {
      "sbatch", "--parsable", "--job-name=a.1.gpuslot-x", "--comment=gpuslot batch x: job a, attempt 1",
      "--output=/logs/50%%.out", "--error=/logs/a.1.err", "--nodes=1", "--ntasks=1", "--gres=gpu:2",
      "--kill-on-invalid-dep=no", "--dependency=afterok:10:11", "--nodelist=node7", "--partition=gpu", "--account=lab",
      // The user's options come last: sbatch takes the last of a repeated option, so theirs win.
      "--time=1:00:00", "--gres=gpu:a100:2", "/logs/a.1.sh"};
  EXPECT_EQ(sbatch_command(input), expected);
  input.afterok.clear();
  input.nodelist.clear();
  SlurmOptions plain;
  input.options = &plain;
  const auto minimal = sbatch_command(input);
  EXPECT_EQ(minimal.size(), 11u);
  EXPECT_EQ(minimal.back(), "/logs/a.1.sh");
}

TEST(SlurmScript, RunsTheCommandUnderGpuslotRunAndRecordsItsEnd) {
  const auto folder = fresh_folder("slurm-script");
  // A stand-in for gpuslot: prints each argument on a line, and the job's variables.
  const auto fake = folder / "fake gpuslot";
  std::ofstream(fake) << "#!/bin/sh\nfor a in \"$@\"; do printf '[%s]\\n' \"$a\"; done\n"
                         "printf 'name=%s attempt=%s seed=%s pwd=%s\\n' \"$GPUSLOT_JOB_NAME\" \"$GPUSLOT_JOB_ATTEMPT\" \"$SEED\" \"$(pwd)\"\n"
                         "exit 7\n";
  ::chmod(fake.c_str(), 0755);
  std::filesystem::create_directories(folder / "work dir");
  JobSpec job;
  job.name = "j";
  job.shell = "echo 'quoted' \"$HOME\" && exit 3";
  job.memory_bytes = 3ull << 30;
  job.gpus = 2;
  job.env = {{"SEED", "it's 1"}};
  ScriptInput input;
  input.job = &job;
  input.attempt = 4;
  input.journal = "/j.db";
  input.run_path = (folder / "j.4.run").string();
  input.cwd = (folder / "work dir").string();
  input.gpuslot_path = fake.string();
  input.gpu_wait = std::chrono::seconds(30);
  input.export_format = ExportFormat::uuid;
  const auto script = folder / "j.4.sh";
  std::ofstream(script) << batch_script(input);
  const std::string command = "SLURM_JOB_ID=77 SLURMD_NODENAME=node7 SLURM_JOB_GPUS=2,3 /bin/sh '" + script.string() +
                              "' > '" + (folder / "out").string() + "'";
  const int status = std::system(command.c_str());
  EXPECT_EQ(WEXITSTATUS(status), 7);
  EXPECT_EQ(read_file(folder / "out"),
            "[run]\n[--mem]\n[3221225472B]\n[--gpus]\n[2]\n[--wait]\n[30000ms]\n[--export]\n[uuid]\n[--]\n[/bin/sh]\n[-c]\n"
            "[echo 'quoted' \"$HOME\" && exit 3]\n"
            "name=j attempt=4 seed=it's 1 pwd=" + (folder / "work dir").string() + "\n");
  const std::string run = read_file(folder / "j.4.run");
  const ScriptRecord record = parse_script_record(run);
  EXPECT_EQ(record.slurm_job_id, "77");
  EXPECT_EQ(record.node, "node7");
  EXPECT_EQ(record.gpus, (std::vector<unsigned>{2, 3}));
  ASSERT_TRUE(record.started_at && record.ended_at);
  EXPECT_LE(*record.started_at, *record.ended_at);
  EXPECT_NE(run.find("\nexit 7\n"), std::string::npos);

  // A directory that is gone on the node: recorded as an error the retry rules read.
  input.cwd = (folder / "gone").string();
  std::ofstream(script) << batch_script(input);
  std::filesystem::remove(folder / "j.4.run");
  EXPECT_EQ(WEXITSTATUS(std::system(("/bin/sh '" + script.string() + "' 2>/dev/null").c_str())), 126);
  EXPECT_NE(read_file(folder / "j.4.run").find("error 126 cannot change to directory"), std::string::npos);
  std::filesystem::remove_all(folder);
}

TEST(SlurmScript, RecordOfARequeuedJobIsItsLatestStart) {
  const auto record = parse_script_record("start 100.5 12 n1 0\nstart 200.25 12 n2 -\nexit 0\nend 210\n");
  EXPECT_EQ(record.node, "n2");
  EXPECT_TRUE(record.gpus.empty());
  EXPECT_EQ(record.started_at, 200.25);
  EXPECT_EQ(record.ended_at, 210.0);
  EXPECT_TRUE(parse_script_record("").slurm_job_id.empty());
}

TEST(SlurmJournal, SlurmColumnsAndTheExecutorRoundTrip) {
  const auto folder = fresh_folder("slurm-journal");
  BatchOptions options;
  options.executor = BatchExecutor::slurm;
  options.journal_path = (folder / "j.db").string();
  options.jobs_hash = 7;
  auto jobs = parse_jobs("true\nfalse\n", JobDefaults{});
  ASSERT_TRUE(jobs);
  std::string batch_id;
  {
    auto opened = open_batch_journal(*jobs, options);
    ASSERT_TRUE(opened) << opened.error().message;
    batch_id = opened->journal->meta("batch_id");
    EXPECT_EQ(batch_id.size(), 8u);
    EXPECT_EQ(opened->journal->meta("executor"), "slurm");
    JobStatus job = opened->jobs[0];
    job.state = JobState::running;
    job.slurm_job_id = "4242";
    job.slurm_node = "node7";
    ASSERT_TRUE(opened->journal->save(job));
    ::close(opened->lock_fd);
  }
  auto read = read_journal(options.journal_path);
  ASSERT_TRUE(read);
  EXPECT_EQ((*read)[0].slurm_job_id, "4242");
  EXPECT_EQ((*read)[0].slurm_node, "node7");
  EXPECT_EQ((*read)[1].slurm_job_id, "");
  // Resumed with the other executor: refused, naming the right one.
  options.resume = true;
  options.executor = BatchExecutor::local;
  auto wrong = open_batch_journal(*jobs, options);
  ASSERT_FALSE(wrong);
  EXPECT_EQ(wrong.error().code, Errc::bad_input);
  EXPECT_NE(wrong.error().message.find("resume it with --executor slurm"), std::string::npos);
  options.executor = BatchExecutor::slurm;
  auto again = open_batch_journal(*jobs, options);
  ASSERT_TRUE(again) << again.error().message;
  EXPECT_EQ(again->journal->meta("batch_id"), batch_id);
  ::close(again->lock_fd);
  std::filesystem::remove_all(folder);
}

TEST(RetryRules, SameForEveryExecutor) {
  BatchOptions options;
  options.oom_backoff = std::chrono::milliseconds(0);
  options.oom_exit_codes = {42};
  JobStatus job;
  job.spec.oom_retries = 1;
  job.spec.failure_retries = 1;
  AttemptEnd oom;
  oom.exit_code = 1;
  oom.output = "torch.OutOfMemoryError: CUDA out of memory";
  EXPECT_EQ(settle_attempt(job, oom, options, "in Slurm job 5", ""), BatchEvent::Kind::oom_requeued);
  EXPECT_EQ(job.state, JobState::queued);
  EXPECT_EQ(job.reason, "out of GPU memory in Slurm job 5 (exit 1); retry 1 of 1");
  AttemptEnd by_code;
  by_code.exit_code = 42;
  EXPECT_EQ(settle_attempt(job, by_code, options, "in Slurm job 6", ""), BatchEvent::Kind::failed);
  EXPECT_EQ(job.reason, "out of GPU memory (exit 42) on 2 attempts; no retries left");

  JobStatus other;
  other.spec.failure_retries = 1;
  AttemptEnd killed;
  killed.signal = 9;
  killed.how = "ended by Slurm: TIMEOUT";
  EXPECT_EQ(settle_attempt(other, killed, options, "", ""), BatchEvent::Kind::failure_requeued);
  EXPECT_EQ(other.reason, "failed (ended by Slurm: TIMEOUT); retry 1 of 1");
  // What the executor knows to be out of memory (no room on the GPU Slurm gave) is, even at exit 0.
  AttemptEnd no_room;
  no_room.exit_code = 0;
  no_room.out_of_memory = true;
  JobStatus third;
  EXPECT_EQ(settle_attempt(third, no_room, options, "", ""), BatchEvent::Kind::oom_requeued);
  AttemptEnd clean;
  clean.exit_code = 0;
  EXPECT_EQ(settle_attempt(third, clean, options, "", ""), BatchEvent::Kind::succeeded);
  EXPECT_TRUE(third.reason.empty());
}

}  // namespace
}  // namespace gpuslot
