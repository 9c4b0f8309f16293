#include <gtest/gtest.h>

#include <set>

#include "util/backoff.hpp"

using tb::Backoff;
using tb::Millis;

TEST(Backoff, CeilingDoublesUpToTheCap) {
  Backoff b(Millis(1000), Millis(8000), 42);
  EXPECT_EQ(b.ceiling(), Millis(1000));
  b.next();
  EXPECT_EQ(b.ceiling(), Millis(2000));
  b.next();
  EXPECT_EQ(b.ceiling(), Millis(4000));
  b.next();
  EXPECT_EQ(b.ceiling(), Millis(8000));
  for (int i = 0; i < 100; ++i) b.next();  // a long outage must not overflow
  EXPECT_EQ(b.ceiling(), Millis(8000));
}

TEST(Backoff, DelaysAreJitteredWithinTheCeiling) {
  Backoff b(Millis(1000), Millis(300000), 7);
  for (int i = 0; i < 8; ++i) b.next();  // ceiling is now 256 s
  std::set<long> seen;
  for (int i = 0; i < 50; ++i) {
    Backoff probe = b;
    const Millis c = probe.ceiling();
    const Millis d = probe.next();
    EXPECT_GT(d.count(), 0);
    EXPECT_LE(d, c);
    seen.insert(d.count());
    b = Backoff(Millis(1000), Millis(300000), 1000 + i);
    for (int k = 0; k < 8; ++k) b.next();
  }
  EXPECT_GT(seen.size(), 40u) << "delays must differ between agents (full jitter)";
}

TEST(Backoff, ResetStartsOver) {
  Backoff b(Millis(500), Millis(60000), 1);
  for (int i = 0; i < 5; ++i) b.next();
  b.reset();
  EXPECT_EQ(b.attempts(), 0u);
  EXPECT_LE(b.next(), Millis(500));
}
