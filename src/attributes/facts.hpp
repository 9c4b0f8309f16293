// Reads the agent's own facts from the machine (docs/attributes.md). Small local reads only
// (uname, /etc/os-release, getifaddrs): nothing that can block the loop for long.
#pragma once

#include <string>

#include "attributes/codec.hpp"
#include "config/config.hpp"

namespace tb::attributes {

Facts collect_facts(const config::Config& cfg, const std::string& agent_version);

}  // namespace tb::attributes
