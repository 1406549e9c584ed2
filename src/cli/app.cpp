#include "cli/app.hpp"

#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>

#include "cli/commands.hpp"
#include "cli/context.hpp"

namespace gpuslot::cli {

int run(int argc, char** argv) {
  Context context;
  CLI::App app{"gpuslot: pick, reserve and schedule NVIDIA GPUs on a shared server", "gpuslot"};
  app.set_version_flag("--version", "gpuslot 0.1.0");
  app.require_subcommand(1);
  app.add_option("--simulate", context.options.simulate,
                 "Use the bundled fake NVML with this host file (e.g. examples/hosts/8x4090.json)");
  app.fallthrough();

  add_status(app, context);
  add_pick(app, context);
  add_device(app, context);

  try {
    app.parse(argc, argv);
    // Subcommand callbacks only record what to do; it runs once options are all known.
    context.prepare(argv[0]);
    if (context.action) context.action();
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // One line, and the same exit status as every other bad input.
    print_error(std::string(e.what()) + " (see gpuslot --help)");
    return 2;
  } catch (const CommandError& e) {
    print_error(e.error().message);
    return exit_code_of(e.error().code);
  } catch (const std::exception& e) {
    print_error(std::string("internal error: ") + e.what());
    return 70;
  }
  return context.exit_code;
}

}  // namespace gpuslot::cli
