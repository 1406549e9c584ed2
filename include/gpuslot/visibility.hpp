// gpuslot/visibility.hpp — which GPUs a CUDA process would see, and under which numbers.
//
// Three numberings exist (../shared/reference/cuda-visible-devices.md): the NVML index (PCI bus
// order, what nvidia-smi prints), CUDA's enumeration order (FASTEST_FIRST unless
// CUDA_DEVICE_ORDER=PCI_BUS_ID), and the CUDA ordinal inside a process, which is the position in
// CUDA_VISIBLE_DEVICES. This layer turns the environment plus a Snapshot into an explicit map,
// parsing CUDA_VISIBLE_DEVICES exactly as the CUDA driver does. Inside a Slurm job it also narrows
// the candidates to the GPUs Slurm granted the job (SlurmGrant). It never calls NVML and never
// touches the environment itself: callers pass the variables in.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gpuslot/error.hpp"
#include "gpuslot/inventory.hpp"

namespace gpuslot {

// The environment variables that decide visibility, as read by the caller.
struct VisibilityEnv {
  std::optional<std::string> cuda_visible_devices;  // nullopt = unset (every GPU visible)
  std::optional<std::string> cuda_device_order;     // "PCI_BUS_ID" or "FASTEST_FIRST"/unset
  // Slurm's grant; all nullopt outside a Slurm job. An empty value counts as unset. (Default
  // initialisers keep `VisibilityEnv{cvd, order}` warning-free.)
  std::optional<std::string> slurm_job_id = std::nullopt;     // SLURM_JOB_ID
  std::optional<std::string> slurm_step_gpus = std::nullopt;  // SLURM_STEP_GPUS: the step's GPUs (srun)
  std::optional<std::string> slurm_job_gpus = std::nullopt;   // SLURM_JOB_GPUS: the job's GPUs (batch step)
};

// Reads CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER, SLURM_JOB_ID, SLURM_STEP_GPUS and SLURM_JOB_GPUS
// from this process's environment.
VisibilityEnv visibility_env_from_process();

// The GPUs Slurm granted the job this process runs in. Slurm numbers a node's GPUs by their
// position in its gres.conf list, which with the documented `File=/dev/nvidia[0-N]` (increasing
// order) is N of /dev/nvidiaN, the device minor number. ConstrainDevices renumbers
// CUDA_VISIBLE_DEVICES (and NVML) from 0 inside the job, but never the minor numbers. So the
// grant is read by matching SLURM_STEP_GPUS (else SLURM_JOB_GPUS) against the minor numbers of
// the GPUs CUDA_VISIBLE_DEVICES shows, and it is their intersection: never more than CUDA sees.
// Where that match cannot work, CUDA_VISIBLE_DEVICES (which Slurm set too) decides alone and
// `note` says why. The evidence and every case: src/visibility/slurm_grant.cpp.
struct SlurmGrant {
  enum class Match {
    minor_number,          // Slurm's numbers matched device minors; granted = that intersection
    cuda_visible_devices,  // they could not be matched (see note): CUDA_VISIBLE_DEVICES alone
    none,                  // no GPU variable and no CUDA_VISIBLE_DEVICES: Slurm granted no GPU
  };
  std::string job_id;                 // SLURM_JOB_ID
  std::string source;                 // "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", or "" when neither is set
  std::string listed;                 // that variable's value, as set
  std::vector<unsigned> numbers;      // its GPU numbers, as listed (empty when unreadable)
  std::vector<unsigned> granted;      // NVML indices of the granted GPUs, in CUDA ordinal order
  Match matched_by = Match::none;
  std::optional<std::string> note;    // one line, set when the grant is not a plain match

  std::string label() const;          // "Slurm job 12" (an odd job id quoted)
};

// Parses a Slurm GPU list: comma-separated decimal numbers, each optionally a range `A-B` (the
// form `scontrol -d show job` prints as IDX; Slurm itself writes plain lists into SLURM_*_GPUS),
// white space around items ignored, repeats dropped, order kept. Errc::bad_input otherwise:
// "SLURM_JOB_GPUS='0,x' is not a list of GPU numbers (expected e.g. 0,1 or 0-3)".
Result<std::vector<unsigned>> parse_slurm_gpu_list(std::string_view variable, std::string_view text);

struct Visibility {
  // NVML indices of the visible GPUs, in CUDA ordinal order: visible[k] is `cuda:k`.
  std::vector<unsigned> visible;
  // True when CUDA_VISIBLE_DEVICES was set (the candidates are restricted to `visible`).
  bool restricted = false;
  // What restricted them, for "not visible" reasons ("CUDA_VISIBLE_DEVICES", "--device cuda:1").
  std::string restricted_by = "CUDA_VISIBLE_DEVICES";
  // Set when the mapping cannot be known exactly (mixed GPU models, integer entries, no
  // CUDA_DEVICE_ORDER=PCI_BUS_ID): CUDA would number by its FASTEST_FIRST heuristic. `visible`
  // then holds the PCI-order reading, and callers that need an in-process ordinal must refuse.
  std::optional<std::string> ambiguity;
  // Human note on how the variable was read, one line, parts joined by "; " ("CUDA_VISIBLE_DEVICES
  // stops at invalid entry '9' (only 8 GPUs)", "CUDA_VISIBLE_DEVICES names device 1 twice: CUDA
  // sees no GPU", …). nullopt when there is nothing to say (unset, or a plain valid list).
  std::optional<std::string> note;
  // Set inside a Slurm job (SLURM_JOB_ID set): what Slurm granted. The candidates are then
  // `visible` ∩ `slurm->granted`; `visible` keeps CUDA's numbering.
  std::optional<SlurmGrant> slurm;

  bool is_visible(unsigned nvml_index) const;
  std::optional<unsigned> cuda_ordinal_of(unsigned nvml_index) const;
  // Visible, and inside a Slurm job granted: the GPUs work may be placed on.
  bool is_candidate(unsigned nvml_index) const;
  // The candidates, in CUDA ordinal order.
  std::vector<unsigned> candidates() const;
  // Why a GPU is not a candidate ("outside CUDA_VISIBLE_DEVICES", "not granted to Slurm job 12");
  // nullopt when it is one.
  std::optional<std::string> why_not_candidate(unsigned nvml_index) const;
};

// Applies CUDA's parsing rules to `env` on the host described by `snapshot`. Never fails: an
// invalid list yields the devices before the first invalid entry, as CUDA does.
//
// The rules (shared/reference/cuda-visible-devices.md; PyTorch's model of the driver):
//   * unset: every GPU, in CUDA's enumeration order; set but empty: none.
//   * comma-separated entries; the k-th accepted entry is cuda:k. The first entry's kind decides
//     the list's kind: `GPU-…` a UUID list, `MIG-…` a MIG list, anything else an integer list.
//   * integer entries read like strtoul: leading white space, an optional `+`, the leading digits,
//     the rest ignored (`1abc` is 1, `-0` is 0). The list stops at the first entry that is
//     negative (so `-1` first hides every GPU), has no leading digit (`NoDevFiles`, a UUID, an
//     empty entry), or is not below the number of GPUs in `snapshot` (lost GPUs count).
//   * UUID entries: a prefix of exactly one GPU's UUID. The list stops at an entry without the
//     `GPU-` prefix, an unknown UUID or a prefix several GPUs share.
//   * a device named twice among the entries read (also through two different UUID prefixes)
//     makes the whole list empty. The repeat check on the text runs before the device count is
//     applied, so "0,9,1,1" on 8 GPUs is empty, not {0}.
// gpuslot's own choices where no source is firm:
//   * UUID entries: surrounding white space is dropped and letter case is ignored (`gpu-ABC…`
//     matches NVML's `GPU-abc…`); `note` says when an entry needed this.
//   * MIG entries (`MIG-…` first): gpuslot schedules whole GPUs only, so `visible` is empty and
//     `note` says "MIG devices are not scheduled by gpuslot".
//   * `NoDevFiles` (any case) hides every GPU, with a note naming it.
//   * CUDA_DEVICE_ORDER counts as PCI_BUS_ID only when it is exactly `PCI_BUS_ID`.
//   * GPUs of different models (by name; unknown names are ignored) without PCI_BUS_ID: integer
//     entries, and the ordinals of an unset variable, are read in PCI order and `ambiguity` is set.
// Inside a Slurm job (env.slurm_job_id set and not empty) `slurm` is filled as SlurmGrant says.
Visibility resolve_visibility(const Snapshot& snapshot, const VisibilityEnv& env);

// A device setting as services write it (`…_DEVICE=auto|cuda|cuda:N|cpu|GPU-<uuid>`).
struct DeviceSpec {
  enum class Kind { automatic, cuda_any, cuda_ordinal, cpu, uuid };
  Kind kind = Kind::automatic;
  unsigned ordinal = 0;     // for cuda_ordinal: the CUDA ordinal inside the current visibility
  std::string uuid_prefix;  // for uuid: "GPU-…" (a unique prefix is enough)
};

// Parses a device spec; Errc::bad_input lists the accepted forms. Case-insensitive keywords,
// surrounding white space ignored. Accepted: `auto`, `cuda`, `cuda:N` (decimal, no sign, no
// white space inside), `cpu`, `GPU-` followed by one or more hex digits or dashes (stored as
// "GPU-" + lower-case, NVML's spelling). Error: "invalid device 'cuda:x': expected auto, cuda,
// cuda:N, cpu or GPU-<uuid>".
Result<DeviceSpec> parse_device_spec(std::string_view text);

// Finds the one GPU whose UUID starts with `prefix` (NVML's spelling; case ignored, surrounding
// white space dropped). Errc::bad_input when none ("no GPU has a UUID starting with 'GPU-zz'") or
// several match ("'GPU-8' matches 3 GPUs (GPU 0, GPU 4, GPU 6); give more of the UUID").
Result<unsigned> nvml_index_of_uuid_prefix(const Snapshot& snapshot, std::string_view prefix);

// `visibility` narrowed to the one GPU a device setting names, for callers that let a user pin
// their choice: `cuda:N` (an ordinal of `visibility`) or `GPU-<uuid>` (a visible GPU); "", `auto`
// and `cuda` leave it as it is. `setting` names the setting in `restricted_by` (so a passed-over
// GPU reads "outside --device cuda:1") and in the refusal of `cpu` ("--device cpu asks for no
// GPU"); the command line passes "--device", the library "device". Errc::bad_input when the spec
// is invalid or `cpu`, the ordinal does not exist, the GPU is hidden or not granted to the Slurm
// job, or ordinals are ambiguous. A restricted, ambiguous visibility is refused even for "":
// which GPUs an integer CUDA_VISIBLE_DEVICES names on a mixed host is CUDA's guess, and handing
// one out might give a child a GPU outside its parent's set. The one implementation behind
// `pick`/`run --device`, `gpuslot device` and the library's device arguments.
Result<Visibility> restrict_to_device(std::string_view spec_text, const Snapshot& snapshot, Visibility visibility,
                                      std::string_view setting = "device");

// The variables a child needs to see exactly `nvml_indices`, in that order (the first is the
// child's cuda:0). The one place a child's GPU environment is built; `run`, `batch` and the
// bindings all use it. Sets, in this order:
//   CUDA_VISIBLE_DEVICES  "3,1" (index) or "GPU-…,GPU-…" (uuid); "" for an empty list (no GPU);
//   CUDA_DEVICE_ORDER     "PCI_BUS_ID" always, so indices mean nvidia-smi's numbering, also for
//                         grandchildren that set their own integer list;
//   GPUSLOT_GPU_UUIDS     "GPU-…,GPU-…" in the same order.
// A repeated index is listed once (CUDA would otherwise hide every GPU). With `uuid`, if any GPU
// is missing from `snapshot` or has no UUID, the index form is written instead (exact too under
// PCI_BUS_ID) and that GPU's entry in GPUSLOT_GPU_UUIDS is empty.
enum class ExportFormat { index, uuid };
struct ChildGpuEnv {
  std::vector<std::pair<std::string, std::string>> set;  // name, value
};
ChildGpuEnv child_gpu_env(const Snapshot& snapshot, const std::vector<unsigned>& nvml_indices,
                          ExportFormat format);

// A child's whole environment as "NAME=value" entries: `base` (a NULL-terminated list such as
// environ) with every variable in `set` replaced. When `set` names a variable twice, the later
// one wins, so callers list the GPU variables last and a job's own settings cannot override them.
std::vector<std::string> child_environment(const char* const* base,
                                           const std::vector<std::pair<std::string, std::string>>& set);

}  // namespace gpuslot
