#include "gpuslot/error.hpp"

namespace gpuslot {

int exit_code_of(Errc code) noexcept {
  switch (code) {
    case Errc::nothing_fits: return 1;
    case Errc::bad_input: return 2;
    case Errc::nvml_unavailable:
    case Errc::nvml_error: return 3;
    case Errc::state: return 4;
    case Errc::timeout: return 124;  // the convention of timeout(1)
    case Errc::internal: return 70;  // EX_SOFTWARE
  }
  return 70;
}

const char* errc_name(Errc code) noexcept {
  switch (code) {
    case Errc::nothing_fits: return "nothing_fits";
    case Errc::bad_input: return "bad_input";
    case Errc::nvml_unavailable: return "nvml_unavailable";
    case Errc::nvml_error: return "nvml_error";
    case Errc::state: return "state";
    case Errc::timeout: return "timeout";
    case Errc::internal: return "internal";
  }
  return "internal";
}

}  // namespace gpuslot
