#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "credentials/credentials.hpp"

namespace fs = std::filesystem;
using namespace tb::credentials;

namespace {
fs::path temp_dir() {
  char tmpl[] = "/tmp/tb-creds-XXXXXX";
  return fs::path(mkdtemp(tmpl));
}
}  // namespace

TEST(Credentials, SaveAndLoadRoundTrip) {
  const auto dir = temp_dir();
  std::string err;
  EXPECT_FALSE(load(dir, &err));
  EXPECT_TRUE(err.empty()) << "a missing file is not an error";
  ASSERT_TRUE(save(dir, {"ACCESS_TOKEN", "tok123", "pump-7"}, &err)) << err;
  auto c = load(dir, &err);
  ASSERT_TRUE(c) << err;
  EXPECT_EQ(c->value, "tok123");
  EXPECT_EQ(c->device_name, "pump-7");
  struct stat st {};
  ASSERT_EQ(stat((dir / kCredentialsFile).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  fs::remove_all(dir);
}

TEST(Credentials, CorruptFileIsAnErrorNotAbsence) {
  const auto dir = temp_dir();
  std::ofstream(dir / kCredentialsFile) << "{not json";
  std::string err;
  EXPECT_FALSE(load(dir, &err));
  EXPECT_FALSE(err.empty());
  std::ofstream(dir / kCredentialsFile, std::ios::trunc)
      << R"({"credentialsType":"X509_CERTIFICATE","credentialsValue":"pem"})";
  EXPECT_FALSE(load(dir, &err));
  EXPECT_NE(err.find("X509_CERTIFICATE"), std::string::npos);
  fs::remove_all(dir);
}

TEST(Credentials, PendingProvisionRoundTrip) {
  const auto dir = temp_dir();
  std::string err;
  PendingProvision p{"dev", "abcDEF123", 2, 1700000000000};
  ASSERT_TRUE(save_pending(dir, p, &err)) << err;
  auto q = load_pending(dir, &err);
  ASSERT_TRUE(q) << err;
  EXPECT_EQ(q->token, "abcDEF123");
  EXPECT_EQ(q->attempts, 2u);
  EXPECT_EQ(q->first_attempt_ms, 1700000000000);
  remove_pending(dir);
  EXPECT_FALSE(load_pending(dir, &err));
  fs::remove_all(dir);
}

TEST(Credentials, GeneratedTokensAreRandomAlphanumerics) {
  std::set<std::string> seen;
  for (int i = 0; i < 200; ++i) {
    const auto t = generate_token();
    ASSERT_EQ(t.size(), 20u);
    for (char ch : t) ASSERT_TRUE(std::isalnum(static_cast<unsigned char>(ch))) << t;
    seen.insert(t);
  }
  EXPECT_EQ(seen.size(), 200u);
}
