#include <gtest/gtest.h>

#include "gpuslot/policy.hpp"
#include "gpuslot/units.hpp"

namespace gpuslot {
namespace {

GpuInfo gpu(unsigned index, double used_gib, double total_gib = 24, std::optional<unsigned> util = 0) {
  GpuInfo info;
  info.nvml_index = index;
  info.uuid = "GPU-" + std::to_string(index) + "aaaaaaa-0000-0000-0000-00000000000" + std::to_string(index);
  info.name = "NVIDIA GeForce RTX 4090";
  info.memory_total_bytes = std::uint64_t(total_gib * double(kGiB));
  info.memory_used_bytes = std::uint64_t(used_gib * double(kGiB));
  info.memory_free_bytes = *info.memory_total_bytes - *info.memory_used_bytes;
  info.utilization_gpu_percent = util;
  return info;
}

Visibility all_of(const Snapshot& snapshot) {
  Visibility visibility;
  for (const auto& info : snapshot.gpus) visibility.visible.push_back(info.nvml_index);
  return visibility;
}

Snapshot seed_host() {  // the situation users describe: GPU 0 nearly full, GPU 1 idle, GPU 2 half used
  Snapshot snapshot;
  snapshot.gpus = {gpu(0, 21.23), gpu(1, 0.23), gpu(2, 15.42), gpu(3, 0.23)};
  return snapshot;
}

TEST(SelectGpus, MostFreeByDefaultTiesToLowestIndex) {
  const Snapshot snapshot = seed_host();
  auto decision = select_gpus(Requirements{}, snapshot, all_of(snapshot));
  ASSERT_TRUE(decision.ok());
  ASSERT_EQ(decision->chosen, std::vector<unsigned>{1});  // GPU 1 and 3 tie: lowest index wins
  EXPECT_TRUE(decision->verdicts[1].chosen);
  EXPECT_NE(decision->verdicts[1].reason.find("most available memory"), std::string::npos);
  EXPECT_NE(decision->verdicts[3].reason.find("eligible"), std::string::npos);
  EXPECT_EQ(decision->verdicts.size(), 4u);
}

TEST(SelectGpus, MemoryFilterExplainsEveryGpu) {
  const Snapshot snapshot = seed_host();
  Requirements requirements;
  requirements.memory_bytes = 8 * kGiB;
  auto decision = select_gpus(requirements, snapshot, all_of(snapshot));
  ASSERT_TRUE(decision.ok());
  EXPECT_EQ(decision->chosen, std::vector<unsigned>{1});
  EXPECT_NE(decision->verdicts[0].reason.find("too little memory: 2.77 GiB available, 8 GiB requested"), std::string::npos)
      << decision->verdicts[0].reason;
  EXPECT_FALSE(decision->verdicts[0].eligible);
}

TEST(SelectGpus, ReservationsReduceAvailableMemory) {
  const Snapshot snapshot = seed_host();
  Requirements requirements;
  requirements.memory_bytes = 12 * kGiB;
  const OutstandingReservations reserved{{1, 20 * kGiB}};
  auto decision = select_gpus(requirements, snapshot, all_of(snapshot), reserved);
  ASSERT_TRUE(decision.ok());
  EXPECT_EQ(decision->chosen, std::vector<unsigned>{3});
  EXPECT_EQ(decision->verdicts[1].reserved_bytes, 20 * kGiB);
  EXPECT_NE(decision->verdicts[1].reason.find("reserved"), std::string::npos);
}

TEST(SelectGpus, PackChoosesSmallestRoomThatFits) {
  const Snapshot snapshot = seed_host();
  Requirements requirements;
  requirements.memory_bytes = 2 * kGiB;
  requirements.strategy = Strategy::pack;
  auto decision = select_gpus(requirements, snapshot, all_of(snapshot));
  ASSERT_TRUE(decision.ok());
  EXPECT_EQ(decision->chosen, std::vector<unsigned>{0});  // 2.77 GiB left on GPU 0 still fits 2 GiB
}

TEST(SelectGpus, LeastBusyPutsUnmeasuredLast) {
  Snapshot snapshot;
  snapshot.gpus = {gpu(0, 1, 24, std::nullopt), gpu(1, 1, 24, 40), gpu(2, 1, 24, 10)};
  Requirements requirements;
  requirements.strategy = Strategy::least_busy;
  requirements.gpu_count = 3;
  auto decision = select_gpus(requirements, snapshot, all_of(snapshot));
  ASSERT_TRUE(decision.ok());
  EXPECT_EQ(decision->chosen, (std::vector<unsigned>{2, 1, 0}));
}

TEST(SelectGpus, LeastUsedIsARatio) {
  Snapshot snapshot;
  snapshot.gpus = {gpu(0, 10, 80), gpu(1, 5, 24)};  // 12.5 % vs 20.8 %
  Requirements requirements;
  requirements.strategy = Strategy::least_used;
  auto decision = select_gpus(requirements, snapshot, all_of(snapshot));
  ASSERT_TRUE(decision.ok());
  EXPECT_EQ(decision->chosen, std::vector<unsigned>{0});
}

TEST(SelectGpus, ExcludeByIndexAndUuidPrefix) {
  const Snapshot snapshot = seed_host();
  Requirements requirements;
  requirements.exclude = {"1", "GPU-3aaa"};
  auto decision = select_gpus(requirements, snapshot, all_of(snapshot));
  ASSERT_TRUE(decision.ok());
  EXPECT_EQ(decision->chosen, std::vector<unsigned>{2});
  EXPECT_EQ(decision->verdicts[1].reason, "excluded");
  EXPECT_EQ(decision->verdicts[3].reason, "excluded");
}

TEST(SelectGpus, ExcludeOfUnknownGpuIsBadInput) {
  const Snapshot snapshot = seed_host();
  Requirements requirements;
  requirements.exclude = {"9"};
  auto decision = select_gpus(requirements, snapshot, all_of(snapshot));
  ASSERT_FALSE(decision.ok());
  EXPECT_EQ(decision.error().code, Errc::bad_input);
  EXPECT_NE(decision.error().message.find("4 GPUs"), std::string::npos);
}

TEST(SelectGpus, InvisibleGpusAreNeverChosen) {
  const Snapshot snapshot = seed_host();
  Visibility visibility;
  visibility.visible = {2, 0};
  visibility.restricted = true;
  auto decision = select_gpus(Requirements{}, snapshot, visibility);
  ASSERT_TRUE(decision.ok());
  EXPECT_EQ(decision->chosen, std::vector<unsigned>{2});
  EXPECT_NE(decision->verdicts[1].reason.find("outside CUDA_VISIBLE_DEVICES"), std::string::npos);
}

TEST(SelectGpus, GpusOutsideTheSlurmGrantAreNeverChosen) {
  const Snapshot snapshot = seed_host();
  Visibility visibility = all_of(snapshot);  // CUDA sees all four (CUDA_VISIBLE_DEVICES unset)
  visibility.slurm = SlurmGrant{};
  visibility.slurm->job_id = "12";
  visibility.slurm->granted = {0, 2};  // GPUs 1 and 3 have the most room, but are not the job's
  auto decision = select_gpus(Requirements{}, snapshot, visibility);
  ASSERT_TRUE(decision.ok());
  EXPECT_EQ(decision->chosen, std::vector<unsigned>{2});
  EXPECT_EQ(decision->verdicts[1].reason, "not a candidate: not granted to Slurm job 12");

  Requirements three;
  three.gpu_count = 3;
  decision = select_gpus(three, snapshot, visibility);
  ASSERT_TRUE(decision.ok());
  EXPECT_TRUE(decision->impossible);
  EXPECT_EQ(decision->summary, "no GPU fits: 3 GPUs requested, but only 2 usable GPUs are granted to Slurm job 12");
}

TEST(SelectGpus, UnhealthyGpuIsPassedOverWithItsError) {
  Snapshot snapshot = seed_host();
  snapshot.gpus[1].healthy = false;
  snapshot.gpus[1].health_error = "GPU is lost (NVML error 15 in nvmlDeviceGetMemoryInfo_v2)";
  auto decision = select_gpus(Requirements{}, snapshot, all_of(snapshot));
  ASSERT_TRUE(decision.ok());
  EXPECT_EQ(decision->chosen, std::vector<unsigned>{3});
  EXPECT_NE(decision->verdicts[1].reason.find("GPU is lost"), std::string::npos);
}

TEST(SelectGpus, MaxUtilizationFilters) {
  Snapshot snapshot;
  snapshot.gpus = {gpu(0, 0, 24, 95), gpu(1, 10, 24, 5)};
  Requirements requirements;
  requirements.max_utilization = 50;
  auto decision = select_gpus(requirements, snapshot, all_of(snapshot));
  ASSERT_TRUE(decision.ok());
  EXPECT_EQ(decision->chosen, std::vector<unsigned>{1});
  EXPECT_NE(decision->verdicts[0].reason.find("95% utilization"), std::string::npos);
}

TEST(SelectGpus, SeveralGpusBestFirst) {
  const Snapshot snapshot = seed_host();
  Requirements requirements;
  requirements.gpu_count = 2;
  requirements.memory_bytes = 4 * kGiB;
  auto decision = select_gpus(requirements, snapshot, all_of(snapshot));
  ASSERT_TRUE(decision.ok());
  EXPECT_EQ(decision->chosen, (std::vector<unsigned>{1, 3}));
}

TEST(SelectGpus, NothingFitsNowIsNotAnErrorAndNotImpossible) {
  const Snapshot snapshot = seed_host();
  Requirements requirements;
  requirements.memory_bytes = 23 * kGiB + 900 * kMiB;  // more than 23.77 GiB free, less than 24 total
  auto decision = select_gpus(requirements, snapshot, all_of(snapshot));
  ASSERT_TRUE(decision.ok());
  EXPECT_FALSE(decision->fits());
  EXPECT_FALSE(decision->impossible);
  EXPECT_NE(decision->summary.find("23.77 GiB available on GPU 1"), std::string::npos) << decision->summary;
}

TEST(SelectGpus, RequestLargerThanAnyGpuIsImpossible) {
  const Snapshot snapshot = seed_host();
  Requirements requirements;
  requirements.memory_bytes = 100 * kGiB;
  auto decision = select_gpus(requirements, snapshot, all_of(snapshot));
  ASSERT_TRUE(decision.ok());
  EXPECT_TRUE(decision->impossible);
  EXPECT_NE(decision->summary.find("largest visible GPU has 24.00 GiB"), std::string::npos) << decision->summary;
}

TEST(SelectGpus, MoreGpusThanVisibleIsImpossible) {
  const Snapshot snapshot = seed_host();
  Requirements requirements;
  requirements.gpu_count = 5;
  auto decision = select_gpus(requirements, snapshot, all_of(snapshot));
  ASSERT_TRUE(decision.ok());
  EXPECT_TRUE(decision->impossible);
}

TEST(SelectGpus, LowMemoryChoiceWarnsButProceeds) {
  Snapshot snapshot;
  snapshot.gpus = {gpu(0, 23, 24)};
  auto decision = select_gpus(Requirements{}, snapshot, all_of(snapshot));
  ASSERT_TRUE(decision.ok());
  EXPECT_TRUE(decision->fits());
  ASSERT_EQ(decision->warnings.size(), 1u);
  EXPECT_NE(decision->warnings[0].find("only 1.00 GiB"), std::string::npos);
}

TEST(ParseStrategy, NamesEveryAcceptedValueOnError) {
  auto result = parse_strategy("fastest");
  ASSERT_FALSE(result.ok());
  EXPECT_NE(result.error().message.find("most-free, least-used, least-busy or pack"), std::string::npos);
  EXPECT_EQ(parse_strategy("pack").value(), Strategy::pack);
}

TEST(ParseExcludeList, AcceptsIndicesAndUuidsRejectsJunk) {
  auto ok = parse_exclude_list("0, 3,GPU-8f2c");
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(*ok, (std::vector<std::string>{"0", "3", "GPU-8f2c"}));
  EXPECT_FALSE(parse_exclude_list("0,,1").ok());
  EXPECT_FALSE(parse_exclude_list("gpu0").ok());
  EXPECT_FALSE(parse_exclude_list("-1").ok());
}

}  // namespace
}  // namespace gpuslot
