// Unit tests of the jobs layer's pure parts: the jobs file, out-of-memory signatures, the
// shell fast path, and the journal's round trip.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

#include "gpuslot/jobs.hpp"
#include "jobs/journal.hpp"
#include "jobs/shepherd.hpp"

namespace gpuslot {
namespace {

using jobs_internal::direct_argv;
using jobs_internal::Journal;

TEST(JobsFile, PlainLinesTakeTheDefaultsAndLineNames) {
  JobDefaults defaults;
  defaults.memory_bytes = 8ull << 30;
  defaults.gpus = 2;
  auto jobs = parse_jobs("# header\n\npython train.py --lr 0.1\n  echo hi  \n", defaults);
  ASSERT_TRUE(jobs) << jobs.error().message;
  ASSERT_EQ(jobs->size(), 2u);
  EXPECT_EQ((*jobs)[0].name, "job-3");
  EXPECT_EQ((*jobs)[0].shell, "python train.py --lr 0.1");
  EXPECT_EQ((*jobs)[0].memory_bytes, 8ull << 30);
  EXPECT_EQ((*jobs)[0].gpus, 2u);
  EXPECT_EQ((*jobs)[0].oom_retries, 3u);
  EXPECT_EQ((*jobs)[1].shell, "echo hi");
}

TEST(JobsFile, JsonLinesEveryField) {
  auto jobs = parse_jobs(
      R"({"name": "a", "cmd": ["python", "x.py"], "mem": "10G", "gpus": 2, "group": "v", "retries": {"oom": 1, "failure": 2}, "env": {"K": "V"}, "cwd": "/", "exclusive": true}
{"name": "b", "cmd": "echo $K", "after": "a", "mem": 512}
)",
      JobDefaults{});
  ASSERT_TRUE(jobs) << jobs.error().message;
  const JobSpec& a = (*jobs)[0];
  EXPECT_EQ(a.argv, (std::vector<std::string>{"python", "x.py"}));
  EXPECT_EQ(a.memory_bytes, 10ull << 30);
  EXPECT_EQ(a.gpus, 2u);
  EXPECT_EQ(a.group, "v");
  EXPECT_EQ(a.oom_retries, 1u);
  EXPECT_EQ(a.failure_retries, 2u);
  ASSERT_EQ(a.env.size(), 1u);
  EXPECT_EQ(a.env[0].second, "V");
  EXPECT_TRUE(a.exclusive);
  EXPECT_EQ((*jobs)[1].after, std::vector<std::string>{"a"});
  EXPECT_EQ((*jobs)[1].memory_bytes, 512ull << 20);  // a bare number is MiB
  // The journal's canonical form reads back to the same job.
  auto again = job_from_json(job_to_json(a), 1);
  ASSERT_TRUE(again) << again.error().message;
  EXPECT_EQ(job_to_json(*again), job_to_json(a));
}

TEST(JobsFile, RejectsWithTheLine) {
  struct Case {
    const char* text;
    const char* message;
  } cases[] = {
      {"{\"cmd\": \"x\", \"gpu\": 1}\n", "line 1: unknown field 'gpu'"},
      {"{\"cmd\": \"x\"}\n{\"cmd\": \"x\", \"mem\": \"lots\"}\n", "line 2: \"mem\""},
      {"{\"name\": \"a\", \"cmd\": \"x\", \"after\": [\"a\"]}\n", "waits for itself"},
      {"{\"name\": \"a\", \"cmd\": \"x\", \"after\": [\"c\"]}\n{\"name\": \"b\", \"cmd\": \"x\", \"after\": [\"a\"]}\n"
       "{\"name\": \"c\", \"cmd\": \"x\", \"after\": [\"b\"]}\n",
       "cycle: a → c → b → a"},
      {"{\"name\": \"../x\", \"cmd\": \"x\"}\n", "line 1: \"name\" must be"},
      {"{\"cmd\": \"x\", \"cwd\": \"/no/such/dir\"}\n", "is not an existing directory"},
      {"{\"cmd\": \"x\", \"retries\": -1}\n", "\"retries\" must be a whole number"},
      {"{\"name\": \"job-2\", \"cmd\": \"x\"}\n{\"cmd\": \"y\"}\n", "line 2: name 'job-2' is already used by line 1"},
  };
  for (const auto& c : cases) {
    auto jobs = parse_jobs(c.text, JobDefaults{});
    ASSERT_FALSE(jobs) << c.text;
    EXPECT_EQ(jobs.error().code, Errc::bad_input);
    EXPECT_NE(jobs.error().message.find(c.message), std::string::npos) << jobs.error().message;
  }
}

TEST(OutOfMemory, RecognisesTheSignatures) {
  EXPECT_TRUE(looks_like_gpu_oom("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"));
  EXPECT_TRUE(looks_like_gpu_oom("CUDA_ERROR_OUT_OF_MEMORY"));
  EXPECT_TRUE(looks_like_gpu_oom("error: cudaErrorMemoryAllocation"));
  EXPECT_FALSE(looks_like_gpu_oom("MemoryError: host ran out of memory"));
  EXPECT_FALSE(looks_like_gpu_oom(""));
}

TEST(ShellFastPath, OnlyPlainWordsSkipTheShell) {
  EXPECT_EQ(direct_argv("python train.py --lr=0.1 data/x"),
            (std::vector<std::string>{"python", "train.py", "--lr=0.1", "data/x"}));
  EXPECT_EQ(direct_argv("  true  "), std::vector<std::string>{"true"});
  for (const char* line : {"echo hi", "cd /tmp", "A=1 prog", "prog > out", "prog $HOME", "prog 'a b'", "a && b",
                           "prog *.txt", "exit 3", "prog # comment", "~/bin/x", "", "test -f x"}) {
    EXPECT_FALSE(direct_argv(line)) << line;
  }
}

TEST(Journal, CreateSaveLoadAndRefuseToOverwrite) {
  const auto folder = std::filesystem::temp_directory_path() / ("gpuslot-journal-" + std::to_string(::getpid()));
  std::filesystem::remove_all(folder);
  std::filesystem::create_directories(folder);
  const std::string path = (folder / "j.db").string();
  auto jobs = parse_jobs("true\nfalse\n", JobDefaults{});
  ASSERT_TRUE(jobs);
  {
    auto journal = Journal::create(path, *jobs, "jobs.txt", 42);
    ASSERT_TRUE(journal) << journal.error().message;
    auto loaded = journal->load();
    ASSERT_TRUE(loaded);
    ASSERT_EQ(loaded->size(), 2u);
    JobStatus job = (*loaded)[1];
    job.state = JobState::failed;
    job.attempts = 2;
    job.exit_code = 1;
    job.gpu_uuids = {"GPU-a", "GPU-b"};
    job.gpu_indices = {3, 1};
    job.reason = "failed (exit 1)";
    job.started_at = 1.5;
    ASSERT_TRUE(journal->save(job));
    EXPECT_EQ(journal->meta("jobs_hash"), "42");
  }
  auto read = read_journal(path);
  ASSERT_TRUE(read) << read.error().message;
  const JobStatus& job = (*read)[1];
  EXPECT_EQ(job.state, JobState::failed);
  EXPECT_EQ(job.attempts, 2u);
  EXPECT_EQ(job.exit_code, 1);
  EXPECT_FALSE(job.signal);
  EXPECT_EQ(job.gpu_uuids, (std::vector<std::string>{"GPU-a", "GPU-b"}));
  EXPECT_EQ(job.gpu_indices, (std::vector<unsigned>{3, 1}));
  EXPECT_EQ(job.started_at, 1.5);
  EXPECT_EQ((*read)[0].state, JobState::queued);
  auto again = Journal::create(path, *jobs, "jobs.txt", 42);
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, Errc::state);
  EXPECT_FALSE(std::filesystem::exists(path + ".new"));
  std::filesystem::remove_all(folder);
}

}  // namespace
}  // namespace gpuslot
