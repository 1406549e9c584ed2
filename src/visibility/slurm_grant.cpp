// slurm_grant.cpp — which GPUs Slurm granted the job this process runs in.
//
// What Slurm sets (Slurm 22.05.8 as Debian ships it, observed on a one-node cluster with fake GRES
// devices, tests/slurm; the code is src/plugins/gres/common/gres_common.c, common_gres_set_env):
//   * SLURM_JOB_GPUS (batch step, and steps inside a batch job) and SLURM_STEP_GPUS (srun steps)
//     list the granted GPUs by their *GRES index*: the position of the device in the node's
//     gres.conf GPU list, comma-separated, no ranges. With gres.conf `File=/dev/nvidia[4-7]` a
//     job granted nvidia4 and nvidia5 sees SLURM_STEP_GPUS=0,1; with the list written
//     nvidia3,nvidia1,… index 0 is nvidia3 (the cgroup allowed exactly that file). Slurm before
//     21.08 wrote the number in the device file's name instead. The two agree, and both equal the
//     /dev/nvidiaN minor number, under the configuration Slurm's gres.conf documentation asks for:
//     `File=/dev/nvidia[0-N]`, "in increasing numeric order".
//   * CUDA_VISIBLE_DEVICES holds the same numbers, except with task/cgroup + ConstrainDevices=yes,
//     where it is renumbered from 0 inside every job (Slurm's gres.html; observed). NVML inside
//     such a job can open only the job's device files and lists only those GPUs, again from 0
//     (`nvidia-smi -L` in a job cgroup shows "GPU 0" for whichever card it was granted; reported
//     by slurm-job-exporter#63 and #2). The minor number of each GPU (nvmlDeviceGetMinorNumber)
//     is the host's in every case.
//   * Slurm documents that the minor number need not follow PCI order (NVML's index): "Mapping
//     between these two is nondeterministic" (gres.html, GPU Management). So Slurm's numbers
//     cannot be read as NVML indices inside a cgroup, and need not equal them outside one.
//
// Hence the rule: the grant is the set of GPUs CUDA_VISIBLE_DEVICES shows whose minor number
// Slurm lists. It is correct with and without cgroups in the documented configuration, and never
// wider than what CUDA will use. When it cannot be applied — an unreadable list, NVML without
// minor numbers, or numbers that match no visible GPU (a gres.conf listing only some devices, or
// out of order, with a Slurm that numbers by position; Slurm 25.11 writing UUIDs into
// CUDA_VISIBLE_DEVICES with PCI-sorted indices) — CUDA_VISIBLE_DEVICES, which Slurm set for the
// same job, decides alone and a note says why. It is what CUDA itself will obey, so it never
// hands out a GPU the job's processes could not use anyway.
//
// A Slurm job with no GPU variable at all and no CUDA_VISIBLE_DEVICES was granted no GPU (it did
// not ask for one, or this is an salloc shell on a login node): none is a candidate. Any GPU it
// took would be one Slurm may have given to another job.
#include <algorithm>
#include <string>
#include <string_view>
#include <vector>

#include "gpuslot/visibility.hpp"
#include "visibility/matching.hpp"
#include "visibility/slurm_grant.hpp"

namespace gpuslot {
namespace {

using namespace visibility_detail;

// gres.conf allows at most 1024 device files per node; anything far beyond is not a GPU number.
constexpr unsigned kLargestGpuNumber = 65535;
constexpr unsigned kLongestRange = 1024;

std::optional<unsigned> read_number(std::string_view text) {
  if (text.empty() || text.size() > 5) return std::nullopt;
  unsigned value = 0;
  for (char c : text) {
    if (!is_ascii_digit(c)) return std::nullopt;
    value = value * 10 + static_cast<unsigned>(c - '0');
  }
  if (value > kLargestGpuNumber) return std::nullopt;
  return value;
}

std::optional<std::string> non_empty(const std::optional<std::string>& value) {
  if (!value || value->empty()) return std::nullopt;
  return value;
}

bool contains(const std::vector<unsigned>& values, unsigned value) {
  return std::find(values.begin(), values.end(), value) != values.end();
}

std::string joined(const std::vector<unsigned>& values) {
  std::string out;
  for (unsigned value : values) out += (out.empty() ? "" : ",") + std::to_string(value);
  return out;
}

std::string gpus_phrase(const std::vector<unsigned>& indices) {
  return (indices.size() == 1 ? "GPU " : "GPUs ") + joined(indices);
}

const GpuInfo* gpu_with_index(const Snapshot& snapshot, unsigned nvml_index) {
  for (const GpuInfo& gpu : snapshot.gpus) {
    if (gpu.nvml_index == nvml_index) return &gpu;
  }
  return nullptr;
}

}  // namespace

Result<std::vector<unsigned>> parse_slurm_gpu_list(std::string_view variable, std::string_view text) {
  const auto malformed = [&] {
    return make_error(Errc::bad_input, std::string(variable) + "=" + quoted(text) +
                                           " is not a list of GPU numbers (expected e.g. 0,1 or 0-3)");
  };
  std::vector<unsigned> numbers;
  std::size_t begin = 0;
  while (begin <= text.size()) {
    std::size_t comma = text.find(',', begin);
    if (comma == std::string_view::npos) comma = text.size();
    const std::string_view item = trim_c_space(text.substr(begin, comma - begin));
    begin = comma + 1;
    const std::size_t dash = item.find('-');
    const auto first = read_number(item.substr(0, dash));
    const auto last = dash == std::string_view::npos ? first : read_number(item.substr(dash + 1));
    if (!first || !last || *last < *first || *last - *first >= kLongestRange) return malformed();
    for (unsigned number = *first; number <= *last; ++number) {
      if (!contains(numbers, number)) numbers.push_back(number);
    }
  }
  return numbers;
}

namespace visibility_detail {

void apply_slurm_grant(const Snapshot& snapshot, const VisibilityEnv& env, Visibility& out) {
  const auto job_id = non_empty(env.slurm_job_id);
  if (!job_id) return;
  SlurmGrant grant;
  grant.job_id = *job_id;
  const std::string job = grant.label();
  // A step's own grant wins: inside a batch job an srun step may have asked for fewer GPUs.
  if (const auto step = non_empty(env.slurm_step_gpus)) {
    grant.source = "SLURM_STEP_GPUS";
    grant.listed = *step;
  } else if (const auto whole_job = non_empty(env.slurm_job_gpus)) {
    grant.source = "SLURM_JOB_GPUS";
    grant.listed = *whole_job;
  }
  const auto follow_cuda_visible_devices = [&](const std::string& why) {
    grant.matched_by = SlurmGrant::Match::cuda_visible_devices;
    grant.granted = out.visible;
    grant.note = why;
  };

  if (grant.source.empty()) {
    if (env.cuda_visible_devices) {
      follow_cuda_visible_devices(job + " sets neither SLURM_STEP_GPUS nor SLURM_JOB_GPUS; following CUDA_VISIBLE_DEVICES as set");
    } else {
      grant.matched_by = SlurmGrant::Match::none;
      grant.note = job + " was granted no GPU (neither SLURM_STEP_GPUS nor SLURM_JOB_GPUS is set): ask for GPUs with "
                         "--gres=gpu:N or --gpus=N; to use GPUs Slurm does not manage, set CUDA_VISIBLE_DEVICES";
    }
    out.slurm = std::move(grant);
    return;
  }

  auto numbers = parse_slurm_gpu_list(grant.source, grant.listed);
  if (!numbers) {
    follow_cuda_visible_devices(numbers.error().message + "; following CUDA_VISIBLE_DEVICES alone");
    out.slurm = std::move(grant);
    return;
  }
  grant.numbers = std::move(numbers).value();
  const std::string listed = grant.source + "=" + quoted(grant.listed);

  std::vector<unsigned> matched;
  std::vector<unsigned> minors_seen;
  for (unsigned index : out.visible) {
    const GpuInfo* gpu = gpu_with_index(snapshot, index);
    if (gpu == nullptr || !gpu->minor_number) continue;  // a lost GPU tells nothing; never a candidate anyway
    minors_seen.push_back(*gpu->minor_number);
    if (contains(grant.numbers, *gpu->minor_number)) matched.push_back(index);
  }
  if (out.visible.empty()) {
    grant.matched_by = SlurmGrant::Match::minor_number;  // nothing to match: CUDA sees no GPU
  } else if (minors_seen.empty()) {
    follow_cuda_visible_devices("NVML does not tell the /dev/nvidiaN minor numbers of the visible GPUs, so " + listed +
                                " cannot be matched; following CUDA_VISIBLE_DEVICES alone");
  } else if (matched.empty()) {
    follow_cuda_visible_devices(listed + " names no visible GPU by /dev/nvidiaN minor number (they are " +
                                joined(minors_seen) +
                                "; gres.conf does not list /dev/nvidia0, 1, ... in order?); following CUDA_VISIBLE_DEVICES alone");
  } else {
    grant.matched_by = SlurmGrant::Match::minor_number;
    grant.granted = matched;
    if (matched.size() < out.visible.size()) {
      std::vector<unsigned> outside;
      for (unsigned index : out.visible) {
        if (!contains(matched, index)) outside.push_back(index);
      }
      grant.note = "this process can also see " + gpus_phrase(outside) + ", which " + job + " was not granted (" +
                   listed + "): " + (outside.size() == 1 ? "it is not a candidate" : "they are not candidates");
    }
  }
  out.slurm = std::move(grant);
}

}  // namespace visibility_detail

// Job ids are numbers; anything else is quoted so the one-line promise holds.
std::string SlurmGrant::label() const {
  const bool plain = !job_id.empty() && job_id.size() <= 20 && std::all_of(job_id.begin(), job_id.end(), is_ascii_digit);
  return "Slurm job " + (plain ? job_id : quoted(job_id));
}

bool Visibility::is_candidate(unsigned nvml_index) const { return !why_not_candidate(nvml_index); }

std::vector<unsigned> Visibility::candidates() const {
  std::vector<unsigned> out;
  for (unsigned index : visible) {
    if (is_candidate(index)) out.push_back(index);
  }
  return out;
}

std::optional<std::string> Visibility::why_not_candidate(unsigned nvml_index) const {
  if (!is_visible(nvml_index)) return "outside " + restricted_by;
  if (slurm && !contains(slurm->granted, nvml_index)) return "not granted to " + slurm->label();
  return std::nullopt;
}

}  // namespace gpuslot
