// Files the agent must never leave half-written: temp file in the same directory, fsync, rename,
// fsync the directory (so the rename itself survives a power cut).
#pragma once

#include <sys/types.h>
#include <cstddef>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

namespace tb {

bool write_file_atomic(const std::filesystem::path& path, std::string_view content, mode_t mode,
                       std::string* error);
// nullopt with *error empty: the file does not exist; with *error set: it could not be read.
// At most max_bytes are read (a file from outside is bounded in memory).
std::optional<std::string> read_file(const std::filesystem::path& path, std::string* error,
                                     std::size_t max_bytes = std::string::npos);
// Creates the directory (and parents) with the given mode if missing.
bool ensure_directory(const std::filesystem::path& dir, mode_t mode, std::string* error);

}  // namespace tb
