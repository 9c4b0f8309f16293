// The command line (docs/interface.md, "Command line"): run, --check-config, --test, --version,
// --help.
#pragma once

namespace tb::daemon {

// Parses argv and runs what it asks for; returns the process exit code.
int cli_main(int argc, char** argv);

}  // namespace tb::daemon
