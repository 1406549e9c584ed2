// select.cpp — the selection policy (DESIGN.md "Selection").
//
// Pure: a Snapshot, a Visibility and the outstanding reservations in, a Decision out. Each GPU
// gets exactly one verdict line, because "why not GPU 3?" is the question users ask most; the
// order of the filters below is the order in which a reason is reported.
#include <algorithm>
#include <cctype>
#include <cstdio>
#include <numeric>

#include "gpuslot/policy.hpp"
#include "gpuslot/units.hpp"

namespace gpuslot {

Result<Strategy> parse_strategy(std::string_view text) {
  if (text == "most-free") return Strategy::most_free;
  if (text == "least-used") return Strategy::least_used;
  if (text == "least-busy") return Strategy::least_busy;
  if (text == "pack") return Strategy::pack;
  return make_error(Errc::bad_input, "invalid strategy " + quote_for_message(text) +
                                         ": expected most-free, least-used, least-busy or pack");
}

const char* strategy_name(Strategy strategy) noexcept {
  switch (strategy) {
    case Strategy::most_free: return "most-free";
    case Strategy::least_used: return "least-used";
    case Strategy::least_busy: return "least-busy";
    case Strategy::pack: return "pack";
  }
  return "most-free";
}

Result<std::vector<std::string>> parse_exclude_list(std::string_view text) {
  std::vector<std::string> tokens;
  std::size_t start = 0;
  while (start <= text.size()) {
    std::size_t end = text.find(',', start);
    if (end == std::string_view::npos) end = text.size();
    std::string token(text.substr(start, end - start));
    token.erase(0, token.find_first_not_of(" \t"));
    token.erase(token.find_last_not_of(" \t") + 1);
    const bool is_index = !token.empty() && std::all_of(token.begin(), token.end(), [](char c) {
      return std::isdigit(static_cast<unsigned char>(c)) != 0;
    });
    const bool is_uuid = token.size() > 4 && (token.rfind("GPU-", 0) == 0 || token.rfind("gpu-", 0) == 0);
    if (!is_index && !is_uuid) {
      return make_error(Errc::bad_input, "invalid GPU " + quote_for_message(token) + " in exclude list " +
                                             quote_for_message(text) + ": expected NVML indices or GPU UUIDs separated by commas, like 0,3 or GPU-8f2c");
    }
    tokens.push_back(std::move(token));
    if (end == text.size()) break;
    start = end + 1;
  }
  return tokens;
}

namespace {

struct Candidate {
  unsigned nvml_index;
  std::uint64_t available;
  double score;  // lower is better
};

double score_of(Strategy strategy, const GpuInfo& gpu, std::uint64_t available) {
  switch (strategy) {
    case Strategy::most_free: return -double(available);
    case Strategy::pack: return double(available);
    case Strategy::least_used:
      return double(gpu.memory_used_bytes.value_or(0)) / double(std::max<std::uint64_t>(1, gpu.memory_total_bytes.value_or(1)));
    case Strategy::least_busy:
      // An unmeasured GPU sorts after every measured one rather than looking idle.
      return gpu.utilization_gpu_percent ? double(*gpu.utilization_gpu_percent) : 1000.0;
  }
  return 0;
}

std::string chosen_reason(Strategy strategy, const GpuInfo& gpu, std::uint64_t available) {
  switch (strategy) {
    case Strategy::most_free: return "chosen: most available memory (" + format_gib(available) + ")";
    case Strategy::pack: return "chosen: smallest room that fits (" + format_gib(available) + " available)";
    case Strategy::least_used: {
      char buffer[96];
      std::snprintf(buffer, sizeof buffer, "chosen: least memory in use (%.0f%%), %s available",
                    100.0 * score_of(strategy, gpu, available), format_gib(available).c_str());
      return buffer;
    }
    case Strategy::least_busy:
      return "chosen: least busy (" +
             (gpu.utilization_gpu_percent ? std::to_string(*gpu.utilization_gpu_percent) + "% utilization" : std::string("utilization unknown")) +
             "), " + format_gib(available) + " available";
  }
  return "chosen";
}

// Resolves exclude tokens to NVML indices; an index or UUID that names no GPU is a typo that
// would otherwise silently exclude nothing.
Result<std::vector<bool>> excluded_mask(const std::vector<std::string>& tokens, const Snapshot& snapshot) {
  std::vector<bool> excluded(snapshot.gpus.size(), false);
  for (const auto& token : tokens) {
    if (!token.empty() && std::isdigit(static_cast<unsigned char>(token[0]))) {
      const unsigned long index = std::strtoul(token.c_str(), nullptr, 10);
      if (token.size() > 6 || index >= snapshot.gpus.size()) {
        return make_error(Errc::bad_input, "cannot exclude GPU " + token + ": this host has " +
                                               std::to_string(snapshot.gpus.size()) + " GPUs (NVML indices 0-" +
                                               std::to_string(snapshot.gpus.empty() ? 0 : snapshot.gpus.size() - 1) + ")");
      }
      excluded[index] = true;
    } else {
      auto index = nvml_index_of_uuid_prefix(snapshot, token);
      if (!index) return std::move(index).error();
      excluded[*index] = true;
    }
  }
  return excluded;
}

}  // namespace

Result<Decision> select_gpus(const Requirements& requirements, const Snapshot& snapshot, const Visibility& visibility,
                             const OutstandingReservations& reservations) {
  if (requirements.gpu_count == 0) {
    return make_error(Errc::bad_input, "invalid GPU count 0: expected 1 or more");
  }
  auto excluded = excluded_mask(requirements.exclude, snapshot);
  if (!excluded) return std::move(excluded).error();

  Decision decision;
  std::vector<Candidate> candidates;
  unsigned usable_by_visibility = 0;
  std::uint64_t largest_total = 0;
  std::optional<std::pair<unsigned, std::uint64_t>> best_too_small;  // for the summary line

  for (const auto& gpu : snapshot.gpus) {
    GpuVerdict verdict;
    verdict.nvml_index = gpu.nvml_index;
    if (auto it = reservations.find(gpu.nvml_index); it != reservations.end()) verdict.reserved_bytes = it->second;
    if (gpu.memory_free_bytes) {
      const std::uint64_t free = *gpu.memory_free_bytes;
      verdict.available_bytes = free > verdict.reserved_bytes ? free - verdict.reserved_bytes : 0;
    }
    const std::uint64_t available = verdict.available_bytes.value_or(0);

    if (auto why = visibility.why_not_candidate(gpu.nvml_index)) {
      verdict.reason = "not a candidate: " + *why;
    } else if ((*excluded)[gpu.nvml_index]) {
      verdict.reason = "excluded";
    } else if (!gpu.healthy) {
      verdict.reason = "unhealthy: " + gpu.health_error;
    } else if (!gpu.memory_free_bytes || !gpu.memory_total_bytes) {
      verdict.reason = "memory unknown: NVML gave no memory reading";
    } else if (requirements.max_utilization && gpu.utilization_gpu_percent &&
               *gpu.utilization_gpu_percent > *requirements.max_utilization) {
      ++usable_by_visibility;
      largest_total = std::max(largest_total, *gpu.memory_total_bytes);
      verdict.reason = "too busy: " + std::to_string(*gpu.utilization_gpu_percent) + "% utilization, at most " +
                       std::to_string(*requirements.max_utilization) + "% allowed";
    } else if (available < requirements.memory_bytes) {
      ++usable_by_visibility;
      largest_total = std::max(largest_total, *gpu.memory_total_bytes);
      verdict.reason = "too little memory: " + format_gib(available) + " available";
      if (verdict.reserved_bytes > 0) {
        verdict.reason += " (" + format_gib(*gpu.memory_free_bytes) + " free - " + format_gib(verdict.reserved_bytes) + " reserved)";
      }
      verdict.reason += ", " + format_size(requirements.memory_bytes) + " requested";
      if (!best_too_small || available > best_too_small->second) best_too_small = std::pair{gpu.nvml_index, available};
    } else {
      ++usable_by_visibility;
      largest_total = std::max(largest_total, *gpu.memory_total_bytes);
      verdict.eligible = true;
      verdict.reason = "eligible: " + format_gib(available) + " available; another GPU ranked higher";
      candidates.push_back({gpu.nvml_index, available, score_of(requirements.strategy, gpu, available)});
    }
    decision.verdicts.push_back(std::move(verdict));
  }

  std::stable_sort(candidates.begin(), candidates.end(), [](const Candidate& a, const Candidate& b) {
    if (a.score != b.score) return a.score < b.score;
    return a.nvml_index < b.nvml_index;
  });

  if (candidates.size() >= requirements.gpu_count) {
    for (unsigned k = 0; k < requirements.gpu_count; ++k) {
      const Candidate& candidate = candidates[k];
      decision.chosen.push_back(candidate.nvml_index);
      GpuVerdict& verdict = decision.verdicts[candidate.nvml_index];
      verdict.chosen = true;
      verdict.reason = chosen_reason(requirements.strategy, snapshot.gpus[candidate.nvml_index], candidate.available);
      if (candidate.available < kLowMemoryWarningBytes) {
        decision.warnings.push_back("GPU " + std::to_string(candidate.nvml_index) + " has only " +
                                    format_gib(candidate.available) + " available");
      }
    }
    std::string list;
    for (unsigned index : decision.chosen) list += (list.empty() ? "" : ",") + std::to_string(index);
    decision.summary = std::string(decision.chosen.size() == 1 ? "GPU " : "GPUs ") + list + " (" +
                       strategy_name(requirements.strategy) + ")";
    return decision;
  }

  // Nothing fits: say what was asked, what the best GPU offers, and whether waiting can help.
  std::string asked = requirements.gpu_count == 1 ? "1 GPU" : std::to_string(requirements.gpu_count) + " GPUs";
  if (requirements.memory_bytes > 0) asked += " with " + format_size(requirements.memory_bytes);
  if (usable_by_visibility < requirements.gpu_count) {
    decision.impossible = true;
    // Inside a Slurm job the limit is the job's grant, not what CUDA could see.
    decision.summary = "no GPU fits: " + asked + " requested, but only " + std::to_string(usable_by_visibility) +
                       " usable GPU" + (usable_by_visibility == 1 ? " is" : "s are") +
                       (visibility.slurm ? " granted to " + visibility.slurm->label() : std::string(" visible"));
  } else if (requirements.memory_bytes > largest_total) {
    decision.impossible = true;
    decision.summary = "no GPU fits: " + asked + " requested, but the largest visible GPU has " +
                       format_gib(largest_total) + " in total";
  } else {
    decision.summary = "no GPU fits now: " + asked + " requested";
    if (best_too_small) {
      decision.summary += "; the most is " + format_gib(best_too_small->second) + " available on GPU " +
                          std::to_string(best_too_small->first);
    } else if (!candidates.empty()) {
      decision.summary += "; only " + std::to_string(candidates.size()) + " GPU" + (candidates.size() == 1 ? "" : "s") + " fit";
    }
  }
  for (auto& verdict : decision.verdicts) {
    if (verdict.eligible) verdict.reason = "eligible: " + format_gib(verdict.available_bytes.value_or(0)) + " available, but too few GPUs fit";
  }
  return decision;
}

}  // namespace gpuslot
