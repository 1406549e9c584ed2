// Unit tests of how leases are shown (src/cli/report.cpp, src/api/report.cpp).
#include <gtest/gtest.h>

#include "cli/report.hpp"

namespace {

gpuslot::LeaseRecord lease(pid_t holder, std::optional<std::int64_t> expires = std::nullopt) {
  gpuslot::LeaseRecord record;
  record.id = "l-test";
  record.holder_pid = holder;
  record.user = "alice";
  record.gpu_uuids = {"GPU-0"};
  record.nvml_indices = {3};
  record.reserved_bytes = 6ull << 30;
  record.command = "batch j1: train";
  record.expires_at_ms = expires;
  return record;
}

std::string table_of(const gpuslot::LeaseRecord& record) {
  testing::internal::CaptureStdout();
  gpuslot::cli::print_lease_table({record}, nullptr);
  return testing::internal::GetCapturedStdout();
}

TEST(LeaseReport, ABatchLeaseNotYetTakenOverIsShownPendingNotPidZero) {
  const std::string pending = table_of(lease(0));
  EXPECT_NE(pending.find(" pending "), std::string::npos) << pending;
  EXPECT_EQ(pending.find(" 0 "), std::string::npos) << pending;
  EXPECT_TRUE(gpuslot::cli::lease_json(lease(0))["pending"].get<bool>());
  EXPECT_EQ(gpuslot::cli::lease_json(lease(0))["pid"].get<int>(), 0);
}

TEST(LeaseReport, HeldLeasesShowTheirHolder) {
  const std::string held = table_of(lease(4242));
  EXPECT_NE(held.find(" 4242 "), std::string::npos) << held;
  EXPECT_EQ(held.find("pending"), std::string::npos) << held;
  EXPECT_FALSE(gpuslot::cli::lease_json(lease(4242))["pending"].get<bool>());
  // `pick --hold` leases live by their expiry, not a holder: never "pending".
  EXPECT_FALSE(gpuslot::cli::lease_json(lease(0, 1'900'000'000'000))["pending"].get<bool>());
}

}  // namespace
