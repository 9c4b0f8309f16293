#include "util/fs.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cerrno>
#include <cstring>

#include <system_error>

namespace tb {

namespace {

std::string errno_text(const std::string& what, const std::filesystem::path& p, int err) {
  return what + " " + p.string() + ": " + std::strerror(err);
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  int release() {
    int f = fd_;
    fd_ = -1;
    return f;
  }

 private:
  int fd_;
};

bool write_all(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

}  // namespace

bool write_file_atomic(const std::filesystem::path& path, std::string_view content, mode_t mode,
                       std::string* error) {
  const std::filesystem::path dir = path.has_parent_path() ? path.parent_path() : ".";
  std::string tmpl = (dir / ("." + path.filename().string() + ".XXXXXX")).string();
  // mkostemp creates the file 0600; fchmod below sets the requested mode before any byte lands,
  // so a secret is never readable by others even for an instant.
  Fd fd(::mkostemp(tmpl.data(), O_CLOEXEC));
  if (fd.get() < 0) {
    if (error) *error = errno_text("cannot create a temporary file in", dir, errno);
    return false;
  }
  auto fail = [&](const std::string& what) {
    const int err = errno;
    ::unlink(tmpl.c_str());
    if (error) *error = errno_text(what, path, err);
    return false;
  };
  if (::fchmod(fd.get(), mode) != 0) return fail("cannot set the mode of");
  if (!write_all(fd.get(), content)) return fail("cannot write");
  if (::fsync(fd.get()) != 0) return fail("cannot fsync");
  if (::close(fd.release()) != 0) return fail("cannot close");
  if (::rename(tmpl.c_str(), path.c_str()) != 0) return fail("cannot rename a temporary file to");
  // The rename is durable only once the directory entry is on disk.
  Fd dfd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dfd.get() >= 0) ::fsync(dfd.get());
  return true;
}

std::optional<std::string> read_file(const std::filesystem::path& path, std::string* error,
                                     std::size_t max_bytes) {
  if (error) error->clear();
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    if (errno != ENOENT && error) *error = errno_text("cannot open", path, errno);
    return std::nullopt;
  }
  std::string out;
  char buf[4096];
  while (out.size() < max_bytes) {
    ssize_t n = ::read(fd.get(), buf, std::min(sizeof buf, max_bytes - out.size()));
    if (n < 0) {
      if (errno == EINTR) continue;
      if (error) *error = errno_text("cannot read", path, errno);
      return std::nullopt;
    }
    if (n == 0) break;
    out.append(buf, static_cast<std::size_t>(n));
  }
  return out;
}

bool ensure_directory(const std::filesystem::path& dir, mode_t mode, std::string* error) {
  std::error_code ec;
  if (std::filesystem::is_directory(dir, ec)) return true;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    if (error) *error = "cannot create directory " + dir.string() + ": " + ec.message();
    return false;
  }
  if (::chmod(dir.c_str(), mode) != 0) {
    if (error) *error = errno_text("cannot set the mode of", dir, errno);
    return false;
  }
  return true;
}

}  // namespace tb
