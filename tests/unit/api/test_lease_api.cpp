// Unit tests of the facade's leases (src/api/lease_api.cpp, session.cpp) on the fake NVML.
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "fake_host.hpp"
#include "gpuslot/gpuslot.hpp"

namespace {

using gpuslot_test::FakeHost;

std::size_t live_leases() {
  auto directory = gpuslot::open_state_directory();
  EXPECT_TRUE(directory.ok());
  return gpuslot::Ledger(*directory).live_leases().size();
}

TEST(LeaseApi, LeaseIsHeldUntilDestroyedAndTakesTheRoom) {
  FakeHost fake;
  {
    auto lease = gpuslot::acquire_lease({.memory_bytes = 16 * gpuslot::kGiB, .gpus = 2});
    ASSERT_TRUE(lease.ok()) << lease.error().message;
    EXPECT_EQ(lease->nvml_indices(), (std::vector<unsigned>{0, 1}));
    EXPECT_EQ(lease->cuda_ordinals(), (std::vector<unsigned>{0, 1}));
    EXPECT_EQ(lease->reserved_bytes(), 16 * gpuslot::kGiB);
    EXPECT_EQ(live_leases(), 1u);
    // The next request goes where the room is.
    gpuslot::Explanation why;
    auto next = gpuslot::acquire_lease({.memory_bytes = 16 * gpuslot::kGiB, .gpus = 2}, &why);
    ASSERT_TRUE(next.ok());
    EXPECT_EQ(next->nvml_indices(), (std::vector<unsigned>{2, 3}));
    EXPECT_EQ(why.gpu_lines.size(), 4u);
    auto none = gpuslot::acquire_lease({.memory_bytes = 16 * gpuslot::kGiB}, &why);
    ASSERT_FALSE(none.ok());
    EXPECT_EQ(none.error().code, gpuslot::Errc::nothing_fits);
    EXPECT_FALSE(why.waiting_cannot_help);
  }
  EXPECT_EQ(live_leases(), 0u);
}

TEST(LeaseApi, MovedLeaseIsReleasedOnce) {
  FakeHost fake;
  auto lease = gpuslot::acquire_lease({.memory_bytes = gpuslot::kGiB});
  ASSERT_TRUE(lease.ok());
  gpuslot::GpuLease moved = std::move(*lease);
  EXPECT_TRUE(moved.held());
  EXPECT_EQ(live_leases(), 1u);
  moved.release();
  moved.release();
  EXPECT_FALSE(moved.held());
  EXPECT_EQ(live_leases(), 0u);
}

TEST(LeaseApi, AForkedChildNeverReleasesItsParentsLeases) {
  FakeHost fake;
  auto scoped = gpuslot::acquire_lease({.memory_bytes = gpuslot::kGiB});
  ASSERT_TRUE(scoped.ok());
  auto selection = gpuslot::select_best_gpu({.memory_bytes = gpuslot::kGiB});  // held until exit
  ASSERT_TRUE(selection.ok());
  ASSERT_EQ(live_leases(), 2u);
  const pid_t child = ::fork();
  if (child == 0) {
    scoped->release();  // the child's copy: closes its descriptor, leaves the parent's lease alone
    std::exit(0);       // runs static destructors, among them the until-exit registry's
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_EQ(live_leases(), 2u);
  EXPECT_EQ(gpuslot::release_held_leases(), 1u);
  EXPECT_EQ(live_leases(), 1u);
}

TEST(LeaseApi, SelectBestGpuExcludesCudaOrdinalsInsideVisibility) {
  FakeHost fake;
  ::setenv("CUDA_VISIBLE_DEVICES", "3,1", 1);
  auto first = gpuslot::select_best_gpu({.memory_bytes = 20 * gpuslot::kGiB, .exclude = {"1"}});
  ASSERT_TRUE(first.ok()) << first.error().message;
  EXPECT_EQ(first->cuda_ordinal, 0u);  // cuda:1 (GPU 1) excluded: cuda:0 is GPU 3
  EXPECT_EQ(first->nvml_index, 3u);
  auto bad = gpuslot::select_best_gpu({.exclude = {"2"}});
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code, gpuslot::Errc::bad_input);
  EXPECT_NE(bad.error().message.find("2 GPUs are visible"), std::string::npos) << bad.error().message;
  ::unsetenv("CUDA_VISIBLE_DEVICES");
}

TEST(LeaseApi, BadRequestsAreBadInputAndReserveNothing) {
  FakeHost fake;
  for (const gpuslot::LeaseRequest& request :
       {gpuslot::LeaseRequest{.gpus = 0}, gpuslot::LeaseRequest{.exclude = {"x"}}, gpuslot::LeaseRequest{.device = "cuda:9"},
        gpuslot::LeaseRequest{.max_utilization = 101}, gpuslot::LeaseRequest{.device = "gpu"}}) {
    auto lease = gpuslot::acquire_lease(request);
    ASSERT_FALSE(lease.ok());
    EXPECT_EQ(lease.error().code, gpuslot::Errc::bad_input) << lease.error().message;
    EXPECT_EQ(lease.error().message.find('\n'), std::string::npos);
  }
  EXPECT_EQ(live_leases(), 0u);
}

TEST(LeaseApi, WaitTimesOutAndCanBeCancelled) {
  FakeHost fake;
  auto all = gpuslot::acquire_lease({.memory_bytes = 20 * gpuslot::kGiB, .gpus = 4});
  ASSERT_TRUE(all.ok());
  auto timed = gpuslot::acquire_lease(
      {.memory_bytes = 20 * gpuslot::kGiB, .wait = true, .timeout = std::chrono::milliseconds(300)});
  ASSERT_FALSE(timed.ok());
  EXPECT_EQ(timed.error().code, gpuslot::Errc::timeout);
  int polls = 0;
  std::string pending;
  auto cancelled = gpuslot::acquire_lease({.memory_bytes = 20 * gpuslot::kGiB,
                                           .wait = true,
                                           .on_pending = [&](const std::string& why) { pending = why; },
                                           .cancelled = [&] { return ++polls > 3; }});
  ASSERT_FALSE(cancelled.ok());
  EXPECT_EQ(cancelled.error().message, "wait cancelled");
  EXPECT_NE(pending.find("no GPU fits now"), std::string::npos) << pending;
  // The cancelled wait has left the queue: no ticket of it is left to keep later waiters behind.
  for (const auto& entry : std::filesystem::directory_iterator(fake.state)) {
    EXPECT_EQ(entry.path().extension(), ".json") << "left behind: " << entry.path();
  }
  all->release();
  auto next = gpuslot::acquire_lease({.memory_bytes = 20 * gpuslot::kGiB, .wait = true,
                                      .timeout = std::chrono::milliseconds(5000)});
  EXPECT_TRUE(next.ok()) << (next.ok() ? "" : next.error().message);
}

TEST(LeaseApi, OutOfMemorySignatures) {
  EXPECT_TRUE(gpuslot::looks_like_out_of_memory("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"));
  EXPECT_TRUE(gpuslot::looks_like_out_of_memory("torch.OutOfMemoryError: …"));
  EXPECT_TRUE(gpuslot::looks_like_out_of_memory("CUDA_ERROR_OUT_OF_MEMORY"));
  EXPECT_TRUE(gpuslot::looks_like_out_of_memory("cudaErrorMemoryAllocation"));
  EXPECT_FALSE(gpuslot::looks_like_out_of_memory("ValueError: bad chunk"));
}

}  // namespace
