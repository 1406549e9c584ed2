#include "cli/app.hpp"

int main(int argc, char** argv) { return gpuslot::cli::run(argc, argv); }
