// slurm_grant.hpp — internal to src/visibility: how resolve_visibility adds Slurm's grant.
#pragma once

#include "gpuslot/inventory.hpp"
#include "gpuslot/visibility.hpp"

namespace gpuslot::visibility_detail {

// Fills `out.slurm` when env.slurm_job_id is set (SlurmGrant in gpuslot/visibility.hpp);
// `out.visible` must already hold CUDA_VISIBLE_DEVICES's reading.
void apply_slurm_grant(const Snapshot& snapshot, const VisibilityEnv& env, Visibility& out);

}  // namespace gpuslot::visibility_detail
