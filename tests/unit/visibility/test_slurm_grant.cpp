// The GPUs Slurm granted a job (src/visibility/slurm_grant.cpp): the SLURM_*_GPUS parser, and the
// grant as the intersection of CUDA_VISIBLE_DEVICES with Slurm's numbers read as /dev/nvidiaN
// minor numbers, with and without a device cgroup, and every fallback. One row per case; the
// row's name says what it guards.
#include <gtest/gtest.h>

#include <optional>
#include <string>
#include <vector>

#include "gpuslot/visibility.hpp"
#include "unit/visibility/hand_made_snapshots.hpp"

namespace gpuslot {
namespace {

// --- the list parser --------------------------------------------------------------------------

struct ListCase {
  const char* name;
  const char* text;
  std::optional<std::vector<unsigned>> numbers;  // nullopt: malformed
};

std::ostream& operator<<(std::ostream& out, const ListCase& c) { return out << c.name; }

const ListCase kListCases[] = {
    {"one_number", "0", std::vector<unsigned>{0}},
    {"comma_list_as_slurm_writes_it", "0,1", std::vector<unsigned>{0, 1}},
    {"order_kept", "3,1", std::vector<unsigned>{3, 1}},
    {"white_space_around_items", " 2 , 3 ", std::vector<unsigned>{2, 3}},
    {"range_as_scontrol_prints_idx", "0-2,5", std::vector<unsigned>{0, 1, 2, 5}},
    {"repeat_dropped", "1,1,0-1", std::vector<unsigned>{1, 0}},
    {"empty", "", std::nullopt},
    {"trailing_comma", "0,", std::nullopt},
    {"word", "NoDevFiles", std::nullopt},
    {"uuid", "GPU-8f2c", std::nullopt},
    {"negative", "-1", std::nullopt},
    {"reversed_range", "2-1", std::nullopt},
    {"open_range", "2-", std::nullopt},
    {"huge_number", "123456", std::nullopt},
    {"huge_range", "0-5000", std::nullopt},
    {"fraction", "1.5", std::nullopt},
    {"other_separator", "0;1", std::nullopt},
    {"sign", "+1", std::nullopt},
};

class SlurmGpuList : public ::testing::TestWithParam<ListCase> {};

TEST_P(SlurmGpuList, Parses) {
  const ListCase& c = GetParam();
  const auto parsed = parse_slurm_gpu_list("SLURM_JOB_GPUS", c.text);
  if (c.numbers) {
    ASSERT_TRUE(parsed) << parsed.error().message;
    EXPECT_EQ(*parsed, *c.numbers);
  } else {
    ASSERT_FALSE(parsed);
    EXPECT_EQ(parsed.error().code, Errc::bad_input);
    EXPECT_EQ(parsed.error().message, "SLURM_JOB_GPUS='" + std::string(c.text) +
                                          "' is not a list of GPU numbers (expected e.g. 0,1 or 0-3)");
  }
}

INSTANTIATE_TEST_SUITE_P(Rows, SlurmGpuList, ::testing::ValuesIn(kListCases),
                         [](const ::testing::TestParamInfo<ListCase>& row) { return std::string(row.param.name); });

// --- the grant --------------------------------------------------------------------------------

// `count` GPUs (NVML index = position) whose /dev/nvidiaN minors are `minors` (nullopt: unknown).
Snapshot host_with_minors(const std::vector<std::optional<unsigned>>& minors) {
  Snapshot snapshot = test::snapshot_of(std::vector<std::string>(minors.size(), "NVIDIA A100-SXM4-80GB"));
  for (std::size_t i = 0; i < minors.size(); ++i) snapshot.gpus[i].minor_number = minors[i];
  return snapshot;
}

using Minors = std::vector<std::optional<unsigned>>;
const Minors kFourInOrder = {0, 1, 2, 3};

struct GrantCase {
  const char* name;
  Minors minors;
  std::optional<std::string> cuda_visible_devices;
  std::optional<std::string> step_gpus;
  std::optional<std::string> job_gpus;
  std::vector<unsigned> visible;  // CUDA's view, unchanged by Slurm
  std::vector<unsigned> granted;
  SlurmGrant::Match matched_by;
  std::string source;
  std::optional<std::string> note;
};

std::ostream& operator<<(std::ostream& out, const GrantCase& c) { return out << c.name; }

using Match = SlurmGrant::Match;

const GrantCase kGrantCases[] = {
    // Without a device cgroup Slurm's numbers, CUDA_VISIBLE_DEVICES and the minors all agree.
    {"batch_job_without_cgroup", kFourInOrder, "1,2", std::nullopt, "1,2", {1, 2}, {1, 2}, Match::minor_number,
     "SLURM_JOB_GPUS", std::nullopt},
    {"srun_step_without_cgroup", kFourInOrder, "3", "3", std::nullopt, {3}, {3}, Match::minor_number,
     "SLURM_STEP_GPUS", std::nullopt},
    {"step_grant_wins_over_the_job_grant", kFourInOrder, "2", "2", "1,2", {2}, {2}, Match::minor_number,
     "SLURM_STEP_GPUS", std::nullopt},
    {"empty_step_variable_falls_back_to_the_job", kFourInOrder, "1,2", "", "1,2", {1, 2}, {1, 2}, Match::minor_number,
     "SLURM_JOB_GPUS", std::nullopt},
    {"user_narrowed_cuda_visible_devices_inside_the_grant", kFourInOrder, "2", std::nullopt, "1,2", {2}, {2},
     Match::minor_number, "SLURM_JOB_GPUS", std::nullopt},
    // ConstrainDevices: NVML lists only the job's GPUs, from 0; CUDA_VISIBLE_DEVICES restarts at 0;
    // the minors keep the host's numbers.
    {"device_cgroup_renumbers_from_zero", {2, 3}, "0,1", std::nullopt, "2,3", {0, 1}, {0, 1}, Match::minor_number,
     "SLURM_JOB_GPUS", std::nullopt},
    {"device_cgroup_one_gpu", {3}, "0", "3", "1,3", {0}, {0}, Match::minor_number, "SLURM_STEP_GPUS", std::nullopt},
    // CUDA_VISIBLE_DEVICES wider than the grant (unset by the user): narrowed, with a note.
    {"unset_cuda_visible_devices_narrowed_to_the_grant", kFourInOrder, std::nullopt, std::nullopt, "1,2",
     {0, 1, 2, 3}, {1, 2}, Match::minor_number, "SLURM_JOB_GPUS",
     "this process can also see GPUs 0,3, which Slurm job 12 was not granted (SLURM_JOB_GPUS='1,2'): they are not "
     "candidates"},
    {"partial_overlap_keeps_only_what_both_name", {2, 1, 0, 3}, "0,1", std::nullopt, "0,1", {0, 1}, {1},
     Match::minor_number, "SLURM_JOB_GPUS",
     "this process can also see GPU 0, which Slurm job 12 was not granted (SLURM_JOB_GPUS='0,1'): it is not a "
     "candidate"},
    // The numbers cannot be matched: CUDA_VISIBLE_DEVICES, set by Slurm for the same job, decides.
    {"minors_not_in_pci_order_and_no_match", {2, 3, 0, 1}, "0,1", std::nullopt, "0,1", {0, 1}, {0, 1},
     Match::cuda_visible_devices, "SLURM_JOB_GPUS",
     "SLURM_JOB_GPUS='0,1' names no visible GPU by /dev/nvidiaN minor number (they are 2,3; gres.conf does not list "
     "/dev/nvidia0, 1, ... in order?); following CUDA_VISIBLE_DEVICES alone"},
    {"gres_conf_lists_a_subset_with_a_cgroup", {2}, "0", std::nullopt, "0", {0}, {0}, Match::cuda_visible_devices,
     "SLURM_JOB_GPUS",
     "SLURM_JOB_GPUS='0' names no visible GPU by /dev/nvidiaN minor number (they are 2; gres.conf does not list "
     "/dev/nvidia0, 1, ... in order?); following CUDA_VISIBLE_DEVICES alone"},
    {"malformed_list", kFourInOrder, "1,2", std::nullopt, "1-x", {1, 2}, {1, 2}, Match::cuda_visible_devices,
     "SLURM_JOB_GPUS",
     "SLURM_JOB_GPUS='1-x' is not a list of GPU numbers (expected e.g. 0,1 or 0-3); following CUDA_VISIBLE_DEVICES "
     "alone"},
    {"nvml_without_minor_numbers", {std::nullopt, std::nullopt}, "0,1", std::nullopt, "0,1", {0, 1}, {0, 1},
     Match::cuda_visible_devices, "SLURM_JOB_GPUS",
     "NVML does not tell the /dev/nvidiaN minor numbers of the visible GPUs, so SLURM_JOB_GPUS='0,1' cannot be "
     "matched; following CUDA_VISIBLE_DEVICES alone"},
    {"a_lost_gpu_without_minor_is_not_granted", {0, std::nullopt, 2, 3}, "0,1", std::nullopt, "0,1", {0, 1}, {0},
     Match::minor_number, "SLURM_JOB_GPUS",
     "this process can also see GPU 1, which Slurm job 12 was not granted (SLURM_JOB_GPUS='0,1'): it is not a "
     "candidate"},
    {"cuda_hides_everything", kFourInOrder, "", std::nullopt, "1", {}, {}, Match::minor_number, "SLURM_JOB_GPUS",
     std::nullopt},
    // No GPU variable at all.
    {"no_gpu_requested", kFourInOrder, std::nullopt, std::nullopt, std::nullopt, {0, 1, 2, 3}, {}, Match::none, "",
     "Slurm job 12 was granted no GPU (neither SLURM_STEP_GPUS nor SLURM_JOB_GPUS is set): ask for GPUs with "
     "--gres=gpu:N or --gpus=N; to use GPUs Slurm does not manage, set CUDA_VISIBLE_DEVICES"},
    {"empty_gpu_variables_grant_nothing", kFourInOrder, std::nullopt, "", "", {0, 1, 2, 3}, {}, Match::none, "",
     "Slurm job 12 was granted no GPU (neither SLURM_STEP_GPUS nor SLURM_JOB_GPUS is set): ask for GPUs with "
     "--gres=gpu:N or --gpus=N; to use GPUs Slurm does not manage, set CUDA_VISIBLE_DEVICES"},
    {"no_gpu_variable_but_cuda_visible_devices_set", kFourInOrder, "3", std::nullopt, std::nullopt, {3}, {3},
     Match::cuda_visible_devices, "",
     "Slurm job 12 sets neither SLURM_STEP_GPUS nor SLURM_JOB_GPUS; following CUDA_VISIBLE_DEVICES as set"},
};

class SlurmGrantRows : public ::testing::TestWithParam<GrantCase> {};

TEST_P(SlurmGrantRows, Grants) {
  const GrantCase& c = GetParam();
  VisibilityEnv env{c.cuda_visible_devices, "PCI_BUS_ID"};
  env.slurm_job_id = "12";
  env.slurm_step_gpus = c.step_gpus;
  env.slurm_job_gpus = c.job_gpus;
  const Visibility v = resolve_visibility(host_with_minors(c.minors), env);
  EXPECT_EQ(v.visible, c.visible);
  ASSERT_TRUE(v.slurm);
  EXPECT_EQ(v.slurm->job_id, "12");
  EXPECT_EQ(v.slurm->granted, c.granted);
  EXPECT_EQ(v.slurm->matched_by, c.matched_by);
  EXPECT_EQ(v.slurm->source, c.source);
  EXPECT_EQ(v.slurm->note, c.note);
  EXPECT_EQ(v.candidates(), c.granted);
  for (unsigned index = 0; index < c.minors.size(); ++index) {
    bool granted = false;
    for (unsigned g : c.granted) granted = granted || g == index;
    EXPECT_EQ(v.is_candidate(index), granted) << "GPU " << index;
  }
}

INSTANTIATE_TEST_SUITE_P(Rows, SlurmGrantRows, ::testing::ValuesIn(kGrantCases),
                         [](const ::testing::TestParamInfo<GrantCase>& row) { return std::string(row.param.name); });

TEST(SlurmGrant, OutsideAJobThereIsNoGrant) {
  const Visibility v = resolve_visibility(host_with_minors(kFourInOrder), VisibilityEnv{"1", "PCI_BUS_ID"});
  EXPECT_FALSE(v.slurm);
  EXPECT_EQ(v.candidates(), std::vector<unsigned>{1});
}

TEST(SlurmGrant, EmptyJobIdIsNotAJob) {
  VisibilityEnv env{std::nullopt, std::nullopt};
  env.slurm_job_id = "";
  env.slurm_job_gpus = "0";
  EXPECT_FALSE(resolve_visibility(host_with_minors(kFourInOrder), env).slurm);
}

TEST(SlurmGrant, ReasonsNameWhatExcludedAGpu) {
  VisibilityEnv env{"0,1,2", "PCI_BUS_ID"};
  env.slurm_job_id = "12";
  env.slurm_job_gpus = "1,2";
  const Visibility v = resolve_visibility(host_with_minors(kFourInOrder), env);
  EXPECT_EQ(v.why_not_candidate(0), "not granted to Slurm job 12");
  EXPECT_EQ(v.why_not_candidate(1), std::nullopt);
  EXPECT_EQ(v.why_not_candidate(3), "outside CUDA_VISIBLE_DEVICES");
  // CUDA's numbering is untouched: GPU 1 is still cuda:1 in this process.
  EXPECT_EQ(v.cuda_ordinal_of(1), 1u);
}

TEST(SlurmGrant, OddJobIdIsQuotedOnOneLine) {
  VisibilityEnv env{std::nullopt, std::nullopt};
  env.slurm_job_id = "12\nforged line";
  const Visibility v = resolve_visibility(host_with_minors(kFourInOrder), env);
  ASSERT_TRUE(v.slurm && v.slurm->note);
  EXPECT_EQ(v.slurm->label(), "Slurm job '12\\x0aforged line'");
  EXPECT_EQ(v.slurm->note->find('\n'), std::string::npos);
}

TEST(SlurmGrant, UuidListFromNewerSlurmInACgroupFallsBackWhenIndicesDiffer) {
  // Slurm 25.11 writes UUIDs into CUDA_VISIBLE_DEVICES and PCI-sorted GRES indices into
  // SLURM_JOB_GPUS; where the minors differ from those indices, the UUIDs decide.
  Snapshot host = host_with_minors({5, 4});
  VisibilityEnv env{host.gpus[1].uuid + "," + host.gpus[0].uuid, std::nullopt};
  env.slurm_job_id = "7";
  env.slurm_job_gpus = "0,1";
  const Visibility v = resolve_visibility(host, env);
  ASSERT_TRUE(v.slurm);
  EXPECT_EQ(v.slurm->matched_by, Match::cuda_visible_devices);
  EXPECT_EQ(v.slurm->granted, (std::vector<unsigned>{1, 0}));
}

}  // namespace
}  // namespace gpuslot
