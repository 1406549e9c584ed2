#include "cli/app.hpp"

#include <CLI/CLI.hpp>
#include <cstdio>
#include <algorithm>
#include <exception>
#include <vector>

#include "gpuslot/units.hpp"

#include "cli/commands.hpp"
#include "cli/context.hpp"

namespace gpuslot::cli {

namespace {

// `gpuslot run [options] [--] CMD ARGS…`: CMD starts at `--` or at the first word after `run`
// that is neither one of run's options nor an option's value, so `gpuslot run --mem 8G python
// train.py --lr 3` gives `--lr 3` to python. The command is taken out before parsing, because a
// parser would read the command's own flags as gpuslot's.
void split_command(std::vector<std::string>& words, std::vector<std::string>& command) {
  static const std::vector<std::string> with_value = {"--mem", "--gpus", "--exclude", "--strategy", "--max-util",
                                                      "--device", "--export", "--simulate"};
  std::size_t i = 0;
  while (i < words.size() && words[i] != "run") {
    if (words[i] == "--simulate") ++i;
    ++i;
  }
  if (i >= words.size()) return;
  for (++i; i < words.size(); ++i) {
    const std::string& word = words[i];
    if (word == "--") {
      command.assign(words.begin() + std::ptrdiff_t(i) + 1, words.end());
      words.resize(i);
      return;
    }
    if (word.empty() || word[0] != '-') {
      command.assign(words.begin() + std::ptrdiff_t(i), words.end());
      words.resize(i);
      return;
    }
    if (std::find(with_value.begin(), with_value.end(), word) != with_value.end()) {
      ++i;  // its value, whatever it looks like
    } else if (word == "--wait" && i + 1 < words.size() &&
               (parse_duration(words[i + 1]).ok() || (i + 2 < words.size() && words[i + 2] == "--"))) {
      ++i;
    }
  }
}

// `--wait [TIMEOUT]` has an optional value, which a parser cannot tell from the command that
// may follow it. Rewrite it to `--wait=VALUE` (or `--wait=forever`) before parsing:
// the next word is its value only if it reads as a duration. Stops at `--`.
std::vector<std::string> normalise_arguments(int argc, char** argv, std::vector<std::string>& command) {
  std::vector<std::string> words(argv + 1, argv + argc);
  split_command(words, command);
  for (std::size_t i = 0; i < words.size() && words[i] != "--"; ++i) {
    if (words[i] != "--wait") continue;
    // `--wait X --`: X can only be meant as the timeout, so a malformed one is reported as such.
    if (i + 1 < words.size() && words[i + 1] != "--" &&
        (parse_duration(words[i + 1]).ok() || (!command.empty() && i + 2 == words.size()))) {
      words[i] = "--wait=" + words[i + 1];
      words.erase(words.begin() + std::ptrdiff_t(i) + 1);
    } else {
      words[i] = "--wait=forever";
    }
  }
  std::reverse(words.begin(), words.end());  // CLI11 takes a vector in reverse order
  return words;
}

}  // namespace

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
  add_run(app, context);
  add_leases(app, context);
  add_batch(app, context);

  try {
    std::vector<std::string> words = normalise_arguments(argc, argv, context.command);
    app.parse(words);
    // Subcommand callbacks only record what to do; it runs once options are all known.
    context.prepare(argv[0]);
    if (context.action) context.action();
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::RequiredError& e) {
    // CLI11 says "A subcommand is required" for `gpuslot frobnicate`: name the word instead.
    std::string word;
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      if (arg == "--simulate") { ++i; continue; }
      if (!arg.empty() && arg[0] != '-') { word = arg; break; }
    }
    print_error(word.empty() ? std::string(e.what()) + " (see gpuslot --help)"
                             : "unknown command " + quote_for_message(word) + ": expected status, pick, device, run, leases or batch");
    return 2;
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
