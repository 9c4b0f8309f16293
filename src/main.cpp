// tb-agent: wiring only. Everything else lives in libraries the tests link.
#include "daemon/cli.hpp"

int main(int argc, char** argv) { return tb::daemon::cli_main(argc, argv); }
