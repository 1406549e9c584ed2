// Unit tests of the C++ worker pool (src/api/pool*.cpp) and its framing, on the fake NVML, with
// C++ workers (the default fork, no interpreter).
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <thread>

#include "api/pool_protocol.hpp"
#include "fake_host.hpp"
#include "gpuslot/pool.hpp"

namespace {

using gpuslot_test::FakeHost;

TEST(PoolProtocol, FramesSurvivePartialReadsAndLargePayloads) {
  int sockets[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sockets), 0);
  const std::string big(3 << 20, 'x');
  std::thread writer([&] {
    EXPECT_TRUE(gpuslot::pool_protocol::write_frame(sockets[0], {gpuslot::pool_protocol::FrameKind::succeeded, 7, "m", big}));
    EXPECT_TRUE(gpuslot::pool_protocol::write_frame(sockets[0], {gpuslot::pool_protocol::FrameKind::failed, 8, "oom", ""}));
    ::close(sockets[0]);
  });
  ::fcntl(sockets[1], F_SETFL, O_NONBLOCK);
  gpuslot::pool_protocol::FrameReader reader;
  std::vector<gpuslot::pool_protocol::Frame> frames;
  bool open = true;
  while (open) {
    ::usleep(1000);
    open = reader.fill(sockets[1]);
    while (auto frame = reader.next()) frames.push_back(std::move(*frame));
  }
  writer.join();
  ::close(sockets[1]);
  ASSERT_EQ(frames.size(), 2u);
  EXPECT_EQ(frames[0].task, 7u);
  EXPECT_EQ(frames[0].payload, big);
  EXPECT_EQ(frames[1].message, "oom");
}

// Attempts are counted in files (each worker is its own process).
bool first_attempt(const std::filesystem::path& marker) {
  if (std::filesystem::exists(marker)) return false;
  std::ofstream(marker).put('x');
  return true;
}

TEST(WorkerPool, ResultsInOrderWithOutOfMemoryAndAWorkerThatDies) {
  FakeHost fake;
  const auto marks = fake.state.parent_path() / ("marks-" + std::to_string(::getpid()));
  std::filesystem::create_directories(marks);
  gpuslot::WorkerProgram program;
  static std::string device;
  program.init = [](const gpuslot::WorkerDevice& d) {
    device = d.device;
    return gpuslot::TaskOutcome::success({});
  };
  program.work = [marks](std::string_view payload) {
    const int item = std::stoi(std::string(payload));
    if (item % 10 == 3 && first_attempt(marks / ("oom-" + std::to_string(item)))) {
      return gpuslot::TaskOutcome::failure("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB");
    }
    if (item == 42 && first_attempt(marks / "die")) ::raise(SIGKILL);
    if (item == 77) return gpuslot::TaskOutcome::failure("ValueError: bad item", "detail");
    return gpuslot::TaskOutcome::success(std::to_string(item * item) + "@" + device);
  };
  auto pool = gpuslot::WorkerPool::create({.memory_bytes = 4 * gpuslot::kGiB, .retries = 3}, program);
  ASSERT_TRUE(pool.ok()) << pool.error().message;
  std::vector<std::string> payloads;
  for (int item = 0; item < 100; ++item) payloads.push_back(std::to_string(item));
  auto results = (*pool)->map(payloads);
  ASSERT_TRUE(results.ok()) << results.error().message;
  ASSERT_EQ(results->size(), 100u);
  for (int item = 0; item < 100; ++item) {
    const gpuslot::TaskResult& result = (*results)[std::size_t(item)];
    if (item == 77) {
      EXPECT_EQ(result.status, gpuslot::TaskResult::Status::failed);
      EXPECT_EQ(result.message, "ValueError: bad item");
      EXPECT_EQ(result.payload, "detail");
      EXPECT_EQ(result.attempts, 1u);
      continue;
    }
    ASSERT_TRUE(result.ok()) << item << ": " << result.message;
    EXPECT_EQ(result.payload.substr(0, result.payload.find('@')), std::to_string(item * item));
    if (item % 10 == 3 || item == 42) {
      ASSERT_EQ(result.attempts, 2u) << item;
      ASSERT_EQ(result.history.size(), 1u);
      EXPECT_NE(result.history[0].find(item == 42 ? "worker died (killed by signal 9" : "out of memory"), std::string::npos)
          << result.history[0];
      // Retried on another GPU.
      EXPECT_EQ(result.history[0].find(" on " + result.device->device + " "), std::string::npos) << result.history[0];
    }
  }
  const auto workers = (*pool)->workers();
  EXPECT_EQ(workers.size(), 4u);
  (*pool)->close();
  std::filesystem::remove_all(marks);
}

TEST(WorkerPool, FatalErrorsFailEveryTaskAndStopThePool) {
  FakeHost fake;
  gpuslot::WorkerProgram program;
  program.init = [](const gpuslot::WorkerDevice&) { return gpuslot::TaskOutcome::failure("ImportError: no model"); };
  program.work = [](std::string_view) { return gpuslot::TaskOutcome::success({}); };
  auto pool = gpuslot::WorkerPool::create({.memory_bytes = gpuslot::kGiB}, program);
  ASSERT_TRUE(pool.ok());
  auto results = (*pool)->map({"a", "b"});
  ASSERT_FALSE(results.ok());
  EXPECT_TRUE((*pool)->failed_in_worker_init());
  EXPECT_NE(results.error().message.find("failed: ImportError: no model"), std::string::npos) << results.error().message;
  EXPECT_FALSE((*pool)->submit("c").ok());

  auto too_many = gpuslot::WorkerPool::create({.workers = 5}, program);
  ASSERT_TRUE(too_many.ok());
  auto refused = (*too_many)->map({"a"});
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, gpuslot::Errc::bad_input);

  auto no_work = gpuslot::WorkerPool::create({}, gpuslot::WorkerProgram{});
  ASSERT_FALSE(no_work.ok());
  EXPECT_EQ(no_work.error().code, gpuslot::Errc::bad_input);
}

TEST(WorkerPool, CallbacksAndCloseCancelsWhatIsQueued) {
  FakeHost fake;
  gpuslot::WorkerProgram program;
  program.work = [](std::string_view payload) {
    ::usleep(20000);
    return gpuslot::TaskOutcome::success(std::string(payload));
  };
  auto pool = gpuslot::WorkerPool::create({.memory_bytes = gpuslot::kGiB, .workers = 1}, program);
  ASSERT_TRUE(pool.ok());
  std::atomic<int> succeeded{0}, cancelled{0};
  for (int k = 0; k < 40; ++k) {
    ASSERT_TRUE((*pool)->submit("x", [&](gpuslot::WorkerPool::TaskId, const gpuslot::TaskResult& result) {
      (result.ok() ? succeeded : cancelled)++;
      EXPECT_TRUE(result.ok() || result.status == gpuslot::TaskResult::Status::cancelled);
    }).ok());
  }
  ::usleep(200000);
  (*pool)->close();
  EXPECT_EQ(succeeded + cancelled, 40);
  EXPECT_GT(succeeded.load(), 0);
  EXPECT_GT(cancelled.load(), 0);
  auto late = (*pool)->submit("late");
  ASSERT_FALSE(late.ok());
  EXPECT_EQ(late.error().code, gpuslot::Errc::bad_input) << "a usage error, not a state directory gone wrong";
  EXPECT_NE(late.error().message.find("closed"), std::string::npos) << late.error().message;
}

}  // namespace
