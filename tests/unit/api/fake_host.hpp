// fake_host.hpp — points this test process at the fake NVML with a private copy of a host file
// (one per process: NVML is opened once per process) and each test at a private state directory.
#pragma once

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>

namespace gpuslot_test {

inline const std::filesystem::path& process_directory() {
  struct Directory {
    pid_t owner = ::getpid();
    std::filesystem::path path = std::filesystem::temp_directory_path() / ("gpuslot-api-test-" + std::to_string(owner));
    Directory() {
      std::filesystem::remove_all(path);
      std::filesystem::create_directories(path);
      std::filesystem::copy_file(std::filesystem::path(GPUSLOT_TEST_HOSTS_DIR) / "4x24g.json", path / "4x24g.json");
    }
    ~Directory() {
      if (::getpid() != owner) return;  // a forked child that exits normally leaves it to its parent
      std::error_code ignored;
      std::filesystem::remove_all(path, ignored);
    }
  };
  static Directory directory;
  return directory.path;
}

// A 4-GPU host (tests/hosts/4x24g.json) and a fresh state directory.
struct FakeHost {
  std::filesystem::path host;
  std::filesystem::path state;

  FakeHost() {
    static int count = 0;
    host = process_directory() / "4x24g.json";
    state = process_directory() / ("state-" + std::to_string(++count));
    ::setenv("GPUSLOT_NVML_LIBRARY", GPUSLOT_FAKE_NVML_PATH, 1);
    ::setenv("GPUSLOT_FAKE_NVML_HOST", host.c_str(), 1);
    ::setenv("GPUSLOT_STATE_DIR", state.c_str(), 1);
    ::unsetenv("CUDA_VISIBLE_DEVICES");
    ::unsetenv("CUDA_DEVICE_ORDER");
    ::unsetenv("SLURM_JOB_ID");
  }
};

}  // namespace gpuslot_test
