// cli/app.hpp — the `gpuslot` entry point.
#pragma once

namespace gpuslot::cli {

// Parses argv, runs one command, returns the process exit status (DESIGN.md "Exit codes").
// The only place exceptions are caught.
int run(int argc, char** argv);

}  // namespace gpuslot::cli
