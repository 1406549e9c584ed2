// chunked_pipeline — transcribes the chunks of a long recording with one persistent worker per
// GPU, fed from one queue; results come back in chunk order.
//
//   ./chunked_pipeline 40 4        # 40 chunks, 4 GiB per worker
//
// Each worker is a process that "loads the model" once (init) and then "transcribes" chunk
// after chunk (work). Its GPU's memory is reserved before it starts. A chunk whose worker runs
// out of GPU memory, or dies, is retried on another GPU; here chunk 7 runs out of memory once.
#include <gpuslot/pool.hpp>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

namespace {

std::string g_device;  // this worker's GPU, set by init in the worker process

// Where chunk 7 notes that it already ran out of memory once (per pool process).
std::string oom_marker(pid_t pool_pid) {
  const char* tmp = std::getenv("TMPDIR");
  return std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/chunked_pipeline." + std::to_string(pool_pid) + ".oom";
}

gpuslot::TaskOutcome load_model(const gpuslot::WorkerDevice& device) {
  g_device = device.device;
  std::fprintf(stderr, "worker %u (pid %d): model loaded on %s (GPU %u)\n", device.worker, int(::getpid()),
               device.device.c_str(), device.nvml_index);
  return gpuslot::TaskOutcome::success({});
}

gpuslot::TaskOutcome transcribe(std::string_view chunk) {
  // A real worker would run the model here. Chunk 7 fails as PyTorch does when the GPU is full,
  // on the first worker that tries it (a marker file tells the later attempt).
  const std::string marker = oom_marker(::getppid());
  if (chunk == "chunk-7" && ::access(marker.c_str(), F_OK) != 0) {
    std::fclose(std::fopen(marker.c_str(), "w"));
    return gpuslot::TaskOutcome::failure("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB");
  }
  return gpuslot::TaskOutcome::success(std::string(chunk) + " transcribed on " + g_device);
}

}  // namespace

int main(int argc, char** argv) {
  const int chunks = argc > 1 ? std::atoi(argv[1]) : 40;
  gpuslot::PoolOptions options;
  options.memory_bytes = static_cast<std::uint64_t>((argc > 2 ? std::atof(argv[2]) : 4.0) * double(gpuslot::kGiB));
  options.retries = 3;

  auto pool = gpuslot::WorkerPool::create(options, gpuslot::WorkerProgram{load_model, transcribe, {}, {}});
  if (!pool) {
    std::fprintf(stderr, "chunked_pipeline: %s\n", pool.error().message.c_str());
    return gpuslot::exit_code_of(pool.error().code);
  }
  std::vector<std::string> payloads;
  for (int k = 0; k < chunks; ++k) payloads.push_back("chunk-" + std::to_string(k));
  auto results = (*pool)->map(std::move(payloads));
  if (!results) {
    std::fprintf(stderr, "chunked_pipeline: %s\n", results.error().message.c_str());
    return gpuslot::exit_code_of(results.error().code);
  }
  int failed = 0;
  for (const auto& result : *results) {
    if (result.ok()) {
      std::printf("%s%s\n", result.payload.c_str(), result.attempts > 1 ? " (after a retry)" : "");
    } else {
      std::printf("FAILED: %s\n", result.message.c_str());
      ++failed;
    }
  }
  (*pool)->close();
  ::unlink(oom_marker(::getpid()).c_str());
  return failed == 0 ? 0 : 1;
}
