// lease_api.cpp — leases for in-process use: acquire_lease (optionally waiting, interruptibly),
// the RAII GpuLease, and select_best_gpu, the seed's one-call API.
//
// A wait that can be cancelled (Ctrl-C in Python) is one Ledger::reserve_waiting call that asks
// `cancelled` as it waits: its FIFO ticket lasts exactly as long as the call, so a cancelled
// wait leaves the queue at once and a caller that carries on (a notebook) blocks nobody.
#include <exception>

#include "api/lease_state.hpp"
#include "gpuslot/jobs.hpp"
#include "api/session.hpp"

namespace gpuslot {

namespace {

Error internal_error(const std::exception& e) { return make_error(Errc::internal, std::string("internal error: ") + e.what()); }

// The visibility a lease request may choose from; an error is kept aside (the ledger's callback
// returns a plain Visibility) and an empty visibility returned, so nothing is chosen.
Visibility visibility_for(const std::string& device, const Snapshot& snapshot, std::optional<Error>& error) {
  auto restricted = restrict_to_device(device, snapshot, current_visibility(snapshot));
  if (restricted) return std::move(*restricted);
  error = std::move(restricted).error();
  Visibility none;
  none.restricted = true;
  none.restricted_by = "the device setting";
  return none;
}

}  // namespace

const char* library_version() noexcept { return "0.1.0"; }

Result<Snapshot> read_snapshot() {
  try {
    return api::snapshot();
  } catch (const std::exception& e) {
    return internal_error(e);
  }
}

Visibility current_visibility(const Snapshot& snapshot) { return resolve_visibility(snapshot, visibility_env_from_process()); }

// --- GpuLease ---

GpuLease::GpuLease(std::unique_ptr<State> state) : state_(std::move(state)) {}
GpuLease::GpuLease(GpuLease&& other) noexcept = default;
GpuLease& GpuLease::operator=(GpuLease&& other) noexcept {
  if (this != &other) {
    release();
    state_ = std::move(other.state_);
  }
  return *this;
}
GpuLease::~GpuLease() = default;  // State's destructor releases (in the owning process only)

namespace {
const std::vector<unsigned> kNoIndices;
const std::vector<std::string> kNoUuids;
const std::string kNoId;
}  // namespace

const std::string& GpuLease::id() const { return state_ && state_->held ? state_->held->record().id : kNoId; }
const std::vector<unsigned>& GpuLease::nvml_indices() const { return state_ ? state_->nvml_indices : kNoIndices; }
const std::vector<std::string>& GpuLease::uuids() const { return state_ ? state_->uuids : kNoUuids; }
const std::vector<unsigned>& GpuLease::cuda_ordinals() const { return state_ ? state_->cuda_ordinals : kNoIndices; }
std::uint64_t GpuLease::reserved_bytes() const { return state_ && state_->held ? state_->held->record().reserved_bytes : 0; }
bool GpuLease::held() const { return state_ && state_->held; }

void GpuLease::release() {
  if (state_) state_->release();
}

void GpuLease::hold_until_exit() {
  if (state_ && state_->held) api::hold_for_process(std::move(state_));
  state_.reset();
}

std::size_t release_held_leases() { return api::release_process_holds(); }

// --- acquire_lease ---

Result<GpuLease> acquire_lease(const LeaseRequest& request, Explanation* explanation) {
  try {
    if (request.gpus == 0 || request.gpus > 1024) {
      return make_error(Errc::bad_input, "invalid GPU count " + std::to_string(request.gpus) + ": expected 1 to 1024");
    }
    if (request.max_utilization && *request.max_utilization > 100) {
      return make_error(Errc::bad_input, "invalid maximum utilization " + std::to_string(*request.max_utilization) +
                                             ": expected a percent, 0 to 100");
    }
    if (request.timeout && request.timeout->count() < 0) {
      return make_error(Errc::bad_input, "invalid timeout: expected zero or more");
    }
    for (const auto& token : request.exclude) {
      auto parsed = parse_exclude_list(token);
      if (!parsed) return std::move(parsed).error();
    }
    if (!request.device.empty()) {
      auto spec = parse_device_spec(request.device);
      if (!spec) return std::move(spec).error();
    }
    ReserveRequest reserve;
    reserve.requirements.memory_bytes = request.memory_bytes;
    reserve.requirements.gpu_count = request.gpus;
    reserve.requirements.exclude = request.exclude;
    reserve.requirements.strategy = request.strategy;
    reserve.requirements.max_utilization = request.max_utilization;
    reserve.command = request.command.empty() ? api::default_command("lease") : request.command;

    auto ledger = api::ledger();
    if (!ledger) return std::move(ledger).error();
    std::optional<Error> visibility_error;
    std::vector<std::string> warnings;
    auto snapshot_source = [] { return api::snapshot(); };
    auto visibility_of = [&](const Snapshot& s) { return visibility_for(request.device, s, visibility_error); };

    Result<Reservation> reservation = make_error(Errc::internal, "not reserved");
    if (!request.wait) {
      reservation = ledger->reserve(reserve, snapshot_source, visibility_of, &warnings);
    } else {
      reservation = ledger->reserve_waiting(reserve, snapshot_source, visibility_of, request.timeout,
                                            request.on_pending ? request.on_pending : [](const std::string&) {}, &warnings,
                                            request.cancelled);
    }
    if (!reservation) return std::move(reservation).error();
    if (visibility_error) return *visibility_error;

    const Visibility visibility = current_visibility(reservation->snapshot);
    api::explain(reservation->decision, reservation->snapshot, visibility, warnings, explanation);
    if (!reservation->lease) {
      std::string message = reservation->decision.summary;
      if (request.wait && reservation->decision.impossible) message += " (waiting cannot help)";
      return make_error(Errc::nothing_fits, message);
    }
    auto state = std::make_unique<GpuLease::State>();
    state->held = std::move(reservation->lease);
    for (unsigned index : reservation->decision.chosen) {
      state->nvml_indices.push_back(index);
      state->uuids.push_back(reservation->snapshot.gpus[index].uuid);
      if (!visibility.ambiguity) {
        if (auto ordinal = visibility.cuda_ordinal_of(index)) state->cuda_ordinals.push_back(*ordinal);
      }
    }
    if (state->cuda_ordinals.size() != state->nvml_indices.size()) state->cuda_ordinals.clear();
    return GpuLease(std::move(state));
  } catch (const std::exception& e) {
    return internal_error(e);
  }
}

// --- select_best_gpu ---

Result<Selection> select_best_gpu(const SelectRequest& request, Explanation* explanation) {
  try {
    auto snapshot = api::snapshot();
    if (!snapshot) return std::move(snapshot).error();
    // An ordinal is what this function returns, so a mapping CUDA would make by its own heuristic
    // is refused, as `gpuslot device` refuses it.
    const Visibility visibility = current_visibility(*snapshot);
    if (visibility.ambiguity) return make_error(Errc::bad_input, *visibility.ambiguity);
    // The exclude list is in the numbering this function returns (CUDA ordinals), or UUIDs: both
    // become UUIDs, which stay true whatever happens between two NVML readings.
    LeaseRequest lease;
    lease.memory_bytes = request.memory_bytes;
    lease.strategy = request.strategy;
    lease.command = request.command.empty() ? api::default_command("select_best_gpu") : request.command;
    for (const auto& token : request.exclude) {
      const bool is_ordinal = !token.empty() && token.find_first_not_of("0123456789") == std::string::npos;
      if (!is_ordinal) {
        auto index = nvml_index_of_uuid_prefix(*snapshot, token);
        if (!index) return std::move(index).error();
        lease.exclude.push_back(snapshot->gpus[*index].uuid);
        continue;
      }
      const std::size_t count = visibility.visible.size();
      const unsigned long ordinal = token.size() > 6 ? ~0ul : std::stoul(token);
      if (ordinal >= count) {
        return make_error(Errc::bad_input, "cannot exclude GPU " + quote_for_message(token) + ": " + std::to_string(count) +
                                               " GPU" + (count == 1 ? " is" : "s are") +
                                               " visible to this process (CUDA ordinals 0-" + std::to_string(count == 0 ? 0 : count - 1) + ")");
      }
      lease.exclude.push_back(snapshot->gpus[visibility.visible[ordinal]].uuid);
    }
    if (visibility.candidates().empty()) {
      return make_error(Errc::nothing_fits, snapshot->gpus.empty()        ? std::string("no NVIDIA GPU on this host")
                                            : visibility.visible.empty() ? "no GPU is visible to this process (CUDA_VISIBLE_DEVICES)"
                                            : visibility.slurm           ? visibility.slurm->label() + " was granted no GPU"
                                                                         : "no GPU is usable");
    }
    auto taken = acquire_lease(lease, explanation);
    if (!taken) return std::move(taken).error();
    Selection selection;
    selection.nvml_index = taken->nvml_indices().front();
    selection.uuid = taken->uuids().front();
    if (taken->cuda_ordinals().empty()) {
      return make_error(Errc::bad_input, "the CUDA ordinal of GPU " + std::to_string(selection.nvml_index) + " is ambiguous here");
    }
    selection.cuda_ordinal = taken->cuda_ordinals().front();
    if (request.memory_bytes > 0) {
      selection.lease_id = taken->id();
      taken->hold_until_exit();
    }
    return selection;
  } catch (const std::exception& e) {
    return internal_error(e);
  }
}

// The signatures live with the batch queue, which matches them against job output: one list.
bool looks_like_out_of_memory(std::string_view text) { return looks_like_gpu_oom(text); }

}  // namespace gpuslot
