// asr_service — a speech-recognition service that resolves its device before loading its model.
//
//   ASR_DEVICE=auto ./asr_service 8      # needs 8 GiB on a GPU; prints cuda:N or cpu
//
// The seed situation: several services start at once with ASR_DEVICE=auto. Each resolves its
// device and reserves the memory its model needs in one atomic step, so they spread over the GPUs
// instead of all landing on the freest one; the reservation lasts as long as the service and is
// released by the kernel when it exits or dies.
#include <gpuslot/gpuslot.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>

int main(int argc, char** argv) {
  gpuslot::DeviceRequest request;
  request.env = "ASR_DEVICE";                                  // auto | cuda | cuda:N | cpu | GPU-<uuid>
  const double gib = argc > 1 ? std::atof(argv[1]) : 8.0;      // what the model needs
  request.memory_bytes = static_cast<std::uint64_t>(gib * double(gpuslot::kGiB));
  request.on_log = [](const std::string& line, bool warning) {
    std::fprintf(stderr, "asr_service: %s%s\n", warning ? "warning: " : "", line.c_str());
  };

  gpuslot::Explanation why;
  auto device = gpuslot::resolve_device(request, &why);
  if (!device) {
    std::fprintf(stderr, "asr_service: %s\n", device.error().message.c_str());
    for (const auto& line : why.gpu_lines) std::fprintf(stderr, "  %s\n", line.c_str());
    return gpuslot::exit_code_of(device.error().code);
  }
  // Load the model on device->device ("cuda:1" is an ordinal inside this process's
  // CUDA_VISIBLE_DEVICES), then serve. Here we only say where it would go.
  std::printf("%s\n", device->device.c_str());
  if (!device->lease_id.empty()) std::fprintf(stderr, "asr_service: holding lease %s\n", device->lease_id.c_str());
  return 0;
}
