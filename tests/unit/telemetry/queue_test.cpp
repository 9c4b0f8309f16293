#include <gtest/gtest.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "telemetry/queue.hpp"

namespace fs = std::filesystem;
using namespace tb::telemetry;
using namespace std::chrono_literals;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    char tmpl[] = "/tmp/tb-queue-XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() {
    umount2(path.c_str(), MNT_DETACH);  // in case a test mounted a tmpfs here
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

Record rec(std::int64_t ts, int readings = 2, std::size_t pad = 0) {
  Record r;
  r.ts_ms = ts;
  r.source = "test";
  for (int i = 0; i < readings; ++i)
    r.readings.push_back({"k" + std::to_string(i), static_cast<double>(ts % 1000) + i * 0.5});
  if (pad) r.readings.push_back({"pad", std::string(pad, 'x')});
  return r;
}

// Sync::Normal unless a test is about durability: fsync costs ~10 ms here and proves nothing
// about batching or limits.
std::unique_ptr<Queue> open_queue(const fs::path& dir, tb::config::QueueConfig qc = {},
                                  std::string* warning = nullptr,
                                  QueueOptions opt = {Sync::Normal}) {
  std::string w, err;
  auto q = Queue::open(dir, qc, opt, &w, &err);
  EXPECT_TRUE(q) << err;
  if (warning) *warning = w;
  return q;
}

// ts of every record in the queue, in drain order (takes and releases everything).
std::vector<std::int64_t> all_ts(Queue& q) {
  std::vector<std::int64_t> out;
  std::vector<Batch> taken;
  for (Batch b = q.next_batch(1 << 20); !b.empty(); b = q.next_batch(1 << 20)) {
    for (const auto& e : nlohmann::json::parse(b.payload))
      out.push_back(e["ts"].get<std::int64_t>());
    taken.push_back(std::move(b));
  }
  for (const auto& b : taken) q.release(b);
  return out;
}

std::vector<fs::path> aside_files(const fs::path& dir) {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().rfind("queue.db.corrupt-", 0) == 0) out.push_back(e.path());
  return out;
}

bool mount_tmpfs(const fs::path& dir, const char* size) {
  const std::string opts = std::string("size=") + size;
  return mount("tmpfs", dir.c_str(), "tmpfs", 0, opts.c_str()) == 0;
}

}  // namespace

TEST(Queue, PushBatchAck) {
  TempDir d;
  auto q = open_queue(d.path);
  std::string err;
  for (int i = 1; i <= 3; ++i) ASSERT_TRUE(q->push(rec(1000 + i), &err)) << err;
  EXPECT_EQ(q->queued_records(), 3u);
  EXPECT_EQ(q->queued_readings(), 6u);
  EXPECT_EQ(fs::path(q->path()), d.path / "queue.db");

  Batch b = q->next_batch(1024);
  ASSERT_EQ(b.ids.size(), 3u);
  EXPECT_EQ(b.readings, 6u);
  EXPECT_EQ(b.payload, encode_records({rec(1001), rec(1002), rec(1003)}));
  EXPECT_TRUE(q->next_batch(1024).empty());  // all in flight

  ASSERT_TRUE(q->ack(b, &err)) << err;
  EXPECT_EQ(q->queued_records(), 0u);
  EXPECT_EQ(q->queued_readings(), 0u);
  EXPECT_EQ(q->dropped_readings(), 0u);
  EXPECT_TRUE(q->next_batch(1024).empty());
}

TEST(Queue, RecordsWithoutEncodableReadingsAreNotStored) {
  TempDir d;
  auto q = open_queue(d.path);
  std::string err;
  Record r;
  r.ts_ms = 1;
  r.readings = {{"a", std::nan("")}};
  EXPECT_TRUE(q->push(r, &err));
  r.readings.clear();
  EXPECT_TRUE(q->push(r, &err));
  EXPECT_EQ(q->queued_records(), 0u);
  r.readings = {{"a", std::nan("")}, {"b", std::int64_t{1}}};
  EXPECT_TRUE(q->push(r, &err));
  EXPECT_EQ(q->queued_readings(), 1u);
}

// The readings of sources that woke together go in with one commit (Manager::store_pending):
// with Sync::Full that is one fsync instead of one per record. One commit appends each page it
// changed to the WAL once; a commit per record would append them once per record.
TEST(Queue, PushAllStoresTheRecordsWithOneCommit) {
  TempDir d;
  auto q = open_queue(d.path, {}, nullptr, QueueOptions{Sync::Full});
  std::string err;
  ASSERT_TRUE(q->push(rec(1), &err)) << err;
  const auto wal = d.path / "queue.db-wal";
  const auto before = fs::file_size(wal);
  std::vector<Record> records;
  for (int i = 2; i <= 11; ++i) records.push_back(rec(i));
  records.push_back(Record{12, "test", {{"nan", std::nan("")}}});  // nothing to store: skipped
  ASSERT_TRUE(q->push_all(records, &err)) << err;
  EXPECT_EQ(q->queued_records(), 11u);
  EXPECT_EQ(q->queued_readings(), 22u);
  const auto frames = (fs::file_size(wal) - before) / (4096 + 24);
  EXPECT_LE(frames, 3u) << "one commit writes the table's and the index's leaf once each";
  q.reset();
  q = open_queue(d.path);
  EXPECT_EQ(all_ts(*q), (std::vector<std::int64_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}));
}

// A VFS in front of the default one that counts xSync calls on write-ahead logs: what reaches
// the disk, seen from SQLite's side.
namespace wal_sync_count {
int syncs = 0;
sqlite3_vfs* base = nullptr;
sqlite3_vfs vfs;
sqlite3_io_methods methods;
const sqlite3_io_methods* base_methods = nullptr;
struct File {
  sqlite3_file self;  // first: SQLite sees a sqlite3_file*
  sqlite3_file* real;
};
sqlite3_file* real(sqlite3_file* f) { return reinterpret_cast<File*>(f)->real; }
int open(sqlite3_vfs*, sqlite3_filename name, sqlite3_file* opened, int flags, int* out) {
  auto* file = reinterpret_cast<File*>(opened);
  file->real = static_cast<sqlite3_file*>(sqlite3_malloc(base->szOsFile));
  std::memset(file->real, 0, static_cast<std::size_t>(base->szOsFile));
  const int rc = base->xOpen(base, name, file->real, flags, out);
  if (rc != SQLITE_OK || !file->real->pMethods) {
    sqlite3_free(file->real);
    file->self.pMethods = nullptr;
    return rc;
  }
  base_methods = file->real->pMethods;
  methods = *base_methods;
  methods.iVersion = 1;  // no shared-memory or mmap methods to forward beyond these
  methods.xClose = [](sqlite3_file* f) {
    const int closed = real(f)->pMethods->xClose(real(f));
    sqlite3_free(real(f));
    sqlite3_free(const_cast<sqlite3_io_methods*>(f->pMethods));  // this file's own table
    f->pMethods = nullptr;
    return closed;
  };
  methods.xRead = [](sqlite3_file* f, void* b, int n, sqlite3_int64 o) {
    return real(f)->pMethods->xRead(real(f), b, n, o);
  };
  methods.xWrite = [](sqlite3_file* f, const void* b, int n, sqlite3_int64 o) {
    return real(f)->pMethods->xWrite(real(f), b, n, o);
  };
  methods.xTruncate = [](sqlite3_file* f, sqlite3_int64 n) {
    return real(f)->pMethods->xTruncate(real(f), n);
  };
  methods.xSync = (flags & SQLITE_OPEN_WAL)
                      ? +[](sqlite3_file* f, int fl) {
                          ++syncs;
                          return real(f)->pMethods->xSync(real(f), fl);
                        }
                      : +[](sqlite3_file* f, int fl) { return real(f)->pMethods->xSync(real(f), fl); };
  methods.xFileSize = [](sqlite3_file* f, sqlite3_int64* n) {
    return real(f)->pMethods->xFileSize(real(f), n);
  };
  methods.xLock = [](sqlite3_file* f, int l) { return real(f)->pMethods->xLock(real(f), l); };
  methods.xUnlock = [](sqlite3_file* f, int l) { return real(f)->pMethods->xUnlock(real(f), l); };
  methods.xCheckReservedLock = [](sqlite3_file* f, int* r) {
    return real(f)->pMethods->xCheckReservedLock(real(f), r);
  };
  methods.xFileControl = [](sqlite3_file* f, int op, void* a) {
    return real(f)->pMethods->xFileControl(real(f), op, a);
  };
  methods.xSectorSize = [](sqlite3_file* f) { return real(f)->pMethods->xSectorSize(real(f)); };
  methods.xDeviceCharacteristics = [](sqlite3_file* f) {
    return real(f)->pMethods->xDeviceCharacteristics(real(f));
  };
  // Each file gets its own copy of the table: the xSync above differs by kind of file.
  auto* own = static_cast<sqlite3_io_methods*>(sqlite3_malloc(sizeof(sqlite3_io_methods)));
  *own = methods;
  file->self.pMethods = own;  // freed by its xClose
  return rc;
}
// The queue runs in locking_mode EXCLUSIVE, so the WAL index lives in heap memory and no
// shared-memory method is needed (iVersion 1 above).
struct Installed {
  Installed() {
    base = sqlite3_vfs_find(nullptr);
    vfs = *base;
    vfs.zName = "tb-test-count-syncs";
    vfs.szOsFile = sizeof(File);
    vfs.xOpen = open;
    sqlite3_vfs_register(&vfs, 1);
    syncs = 0;
  }
  ~Installed() {
    sqlite3_vfs_unregister(&vfs);
    sqlite3_vfs_register(base, 1);
  }
};
}  // namespace wal_sync_count

// Sync::Full: every push reaches the disk before it returns, also after acks and limit deletes
// (which need not, and do not, wait for the disk); the connection itself stays at NORMAL.
TEST(Queue, EveryPushIsSyncedAndNoAckIs) {
  TempDir d;
  wal_sync_count::Installed counting;
  auto q = open_queue(d.path, {}, nullptr, QueueOptions{Sync::Full});
  std::string err;
  for (int round = 1; round <= 3; ++round) {
    const int before = wal_sync_count::syncs;
    ASSERT_TRUE(q->push(rec(round), &err)) << err;
    EXPECT_EQ(wal_sync_count::syncs, before + 1)
        << "round " << round << ": the push was not synced";
    const auto batch = q->next_batch(1 << 20);
    ASSERT_FALSE(batch.empty());
    const int acked = wal_sync_count::syncs;
    ASSERT_TRUE(q->ack(batch, &err)) << err;
    EXPECT_EQ(wal_sync_count::syncs, acked) << "round " << round << ": an ack waited for the disk";
  }
  std::vector<Record> records{rec(10), rec(11), rec(12)};
  const int before = wal_sync_count::syncs;
  ASSERT_TRUE(q->push_all(records, &err)) << err;
  EXPECT_EQ(wal_sync_count::syncs, before + 1) << "one commit, one sync";
  q.reset();
  EXPECT_EQ(all_ts(*open_queue(d.path)), (std::vector<std::int64_t>{10, 11, 12}));
}

// Sync::Normal: nothing waits for the disk.
TEST(Queue, SyncNormalNeverWaitsForTheDisk) {
  TempDir d;
  wal_sync_count::Installed counting;
  auto q = open_queue(d.path, {}, nullptr, QueueOptions{Sync::Normal});
  std::string err;
  const int before = wal_sync_count::syncs;
  for (int i = 1; i <= 3; ++i) ASSERT_TRUE(q->push(rec(i), &err)) << err;
  ASSERT_TRUE(q->ack(q->next_batch(1 << 20), &err)) << err;
  EXPECT_EQ(wal_sync_count::syncs, before);
}

// All or nothing: a commit that does not fit leaves the queue as it was, and it works again
// once there is room.
TEST(Queue, PushAllThatDoesNotFitStoresNothing) {
  TempDir d;
  if (!mount_tmpfs(d.path, "256k"))
    GTEST_SKIP() << "cannot mount a tmpfs: " << std::strerror(errno);
  auto q = open_queue(d.path, {}, nullptr, QueueOptions{Sync::Full});
  std::string err;
  ASSERT_TRUE(q->push(rec(1), &err)) << err;
  ASSERT_TRUE(q->push(rec(2), &err)) << err;
  std::vector<Record> records;
  for (int i = 3; i < 300; ++i) records.push_back(rec(i, 2, 1000));  // ~300 KB: cannot fit
  EXPECT_FALSE(q->push_all(records, &err));
  EXPECT_NE(err.find("full"), std::string::npos) << err;
  EXPECT_EQ(q->queued_records(), 2u);
  EXPECT_EQ(all_ts(*q), (std::vector<std::int64_t>{1, 2}));
  records.resize(5);
  ASSERT_TRUE(q->push_all(records, &err)) << err;
  EXPECT_EQ(all_ts(*q), (std::vector<std::int64_t>{1, 2, 3, 4, 5, 6, 7}));
  q.reset();
  q = open_queue(d.path);
  EXPECT_EQ(q->queued_records(), 7u);
  q.reset();
  umount2(d.path.c_str(), MNT_DETACH);
}

TEST(Queue, InFlightRecordsAreSkippedUntilReleased) {
  TempDir d;
  auto q = open_queue(d.path);
  std::string err;
  for (int i = 1; i <= 3; ++i) ASSERT_TRUE(q->push(rec(i), &err));
  const std::size_t two = encode_records({rec(1), rec(2)}).size();
  Batch b1 = q->next_batch(two);
  ASSERT_EQ(b1.ids.size(), 2u);
  Batch b2 = q->next_batch(two);
  ASSERT_EQ(b2.ids.size(), 1u);
  EXPECT_EQ(b2.payload, encode_records({rec(3)}));
  EXPECT_TRUE(q->next_batch(two).empty());
  q->release(b1);
  Batch b3 = q->next_batch(1024);
  EXPECT_EQ(b3.ids, b1.ids);
  EXPECT_EQ(b3.payload, b1.payload);
  EXPECT_EQ(q->queued_records(), 3u);  // in flight is still queued
}

TEST(Queue, DropRemovesAndCounts) {
  TempDir d;
  auto q = open_queue(d.path);
  std::string err;
  for (int i = 1; i <= 3; ++i) ASSERT_TRUE(q->push(rec(i, 3), &err));
  Batch b = q->next_batch(1);  // single-record mode
  ASSERT_EQ(b.ids.size(), 1u);
  ASSERT_TRUE(q->drop(b, &err)) << err;
  EXPECT_EQ(q->dropped_readings(), 3u);
  EXPECT_EQ(q->queued_readings(), 6u);
  EXPECT_EQ(q->queued_records(), 2u);
  // Dropping or acking the same ids again finds nothing: no double count.
  ASSERT_TRUE(q->drop(b, &err));
  ASSERT_TRUE(q->ack(b, &err));
  EXPECT_EQ(q->dropped_readings(), 3u);
  EXPECT_EQ(q->queued_readings(), 6u);
}

TEST(Queue, BatchesAreAsLargeAsFitAndNoLarger) {
  TempDir d;
  auto q = open_queue(d.path);
  std::string err;
  std::mt19937 rng(7);
  std::vector<Record> recs;
  for (int i = 0; i < 200; ++i) {
    recs.push_back(rec(1700000000000 + i, 1 + static_cast<int>(rng() % 6), rng() % 40));
    ASSERT_TRUE(q->push(recs.back(), &err));
  }
  for (std::uint64_t max : {1u, 30u, 64u, 100u, 200u, 333u, 512u, 1024u, 4096u}) {
    std::size_t next = 0;
    std::vector<Batch> taken;
    for (Batch b = q->next_batch(max); !b.empty(); b = q->next_batch(max)) {
      if (b.ids.size() > 1) {
        EXPECT_LE(b.payload.size(), max);
      }
      std::vector<Record> expect(recs.begin() + static_cast<long>(next),
                                 recs.begin() + static_cast<long>(next + b.ids.size()));
      EXPECT_EQ(b.payload, encode_records(expect));
      next += b.ids.size();
      // As large as fits: the following record would not have.
      if (next < recs.size()) {
        EXPECT_GT(b.payload.size() + 1 + encode_record(recs[next]).size(), max) << max;
      }
      taken.push_back(std::move(b));
    }
    EXPECT_EQ(next, recs.size());
    for (const auto& b : taken) q->release(b);
  }
}

TEST(Queue, OversizedRecordLeavesAlone) {
  TempDir d;
  auto q = open_queue(d.path);
  std::string err;
  ASSERT_TRUE(q->push(rec(1, 1, 3000), &err));
  ASSERT_TRUE(q->push(rec(2), &err));
  Batch b = q->next_batch(1024);
  ASSERT_EQ(b.ids.size(), 1u);
  EXPECT_GT(b.payload.size(), 1024u);
  EXPECT_EQ(b.payload, encode_records({rec(1, 1, 3000)}));
  Batch b2 = q->next_batch(1024);
  EXPECT_EQ(b2.ids.size(), 1u);
}

TEST(Queue, NewestFirst) {
  TempDir d;
  tb::config::QueueConfig qc;
  qc.order = tb::config::DrainOrder::NewestFirst;
  auto q = open_queue(d.path, qc);
  std::string err;
  for (int i = 1; i <= 5; ++i) ASSERT_TRUE(q->push(rec(i), &err));
  Batch b = q->next_batch(encode_records({rec(5), rec(4)}).size());
  EXPECT_EQ(b.payload, encode_records({rec(5), rec(4)}));
  EXPECT_EQ(all_ts(*q), (std::vector<std::int64_t>{3, 2, 1}));
  // Switching the order by reload takes effect on the next batch.
  qc.order = tb::config::DrainOrder::OldestFirst;
  q->set_limits(qc);
  EXPECT_EQ(all_ts(*q), (std::vector<std::int64_t>{1, 2, 3}));
}

TEST(Queue, SurvivesCloseAndReopen) {
  TempDir d;
  std::string err;
  {
    auto q = open_queue(d.path, {}, nullptr, QueueOptions{Sync::Full});
    for (int i = 1; i <= 5; ++i) ASSERT_TRUE(q->push(rec(i, 3), &err));
    Batch b = q->next_batch(encode_records({rec(1, 3), rec(2, 3)}).size());
    ASSERT_EQ(b.ids.size(), 2u);
    ASSERT_TRUE(q->ack(b, &err));
    Batch in_flight = q->next_batch(1);  // never acked: must be there after the restart
    ASSERT_EQ(in_flight.ids.size(), 1u);
  }
  std::string warning;
  auto q = open_queue(d.path, {}, &warning, QueueOptions{Sync::Full});
  EXPECT_EQ(warning, "");
  EXPECT_EQ(q->queued_records(), 3u);
  EXPECT_EQ(q->queued_readings(), 9u);
  EXPECT_EQ(all_ts(*q), (std::vector<std::int64_t>{3, 4, 5}));
  // New ids continue after the old ones (drain order stays insertion order).
  ASSERT_TRUE(q->push(rec(6, 3), &err));
  EXPECT_EQ(all_ts(*q), (std::vector<std::int64_t>{3, 4, 5, 6}));
}

TEST(Queue, MaxAgeDropsExactlyTheOldest) {
  TempDir d;
  tb::config::QueueConfig qc;
  qc.max_age = 5000ms;
  auto q = open_queue(d.path, qc);
  std::string err;
  for (int i = 1; i <= 10; ++i) ASSERT_TRUE(q->push(rec(i * 1000, 2), &err));
  EXPECT_EQ(q->enforce_limits(11000), 2u * 5);  // ts 1000..5000 are older than 6000
  EXPECT_EQ(q->dropped_readings(), 10u);
  EXPECT_EQ(q->queued_readings(), 10u);
  EXPECT_EQ(all_ts(*q), (std::vector<std::int64_t>{6000, 7000, 8000, 9000, 10000}));
  EXPECT_EQ(q->enforce_limits(11000), 0u);
}

TEST(Queue, LimitsDropInFlightRecordsOnce) {
  TempDir d;
  tb::config::QueueConfig qc;
  qc.max_age = 5000ms;
  auto q = open_queue(d.path, qc);
  std::string err;
  for (int i = 1; i <= 4; ++i) ASSERT_TRUE(q->push(rec(i * 1000, 2), &err));
  Batch b = q->next_batch(1024);  // all four in flight
  ASSERT_EQ(b.ids.size(), 4u);
  EXPECT_EQ(q->enforce_limits(7500), 4u);  // ts 1000, 2000 dropped
  EXPECT_EQ(q->dropped_readings(), 4u);
  ASSERT_TRUE(q->drop(b, &err));  // only 3000 and 4000 are left to drop
  EXPECT_EQ(q->dropped_readings(), 8u);
  EXPECT_EQ(q->queued_readings(), 0u);
  EXPECT_EQ(q->queued_records(), 0u);
}

TEST(Queue, MaxSizeDropsExactlyTheOldest) {
  TempDir d;
  tb::config::QueueConfig qc;
  qc.max_size = 1 << 20;
  auto q = open_queue(d.path, qc);
  std::string err;
  const int n = 2000;
  for (int i = 1; i <= n; ++i) ASSERT_TRUE(q->push(rec(i, 4, 700), &err)) << err;
  // push() enforced the size by itself.
  EXPECT_LE(q->size_on_disk(), qc.max_size);
  EXPECT_GT(q->dropped_readings(), 0u);
  EXPECT_EQ(q->queued_readings() + q->dropped_readings(), 5u * n);
  const auto ts = all_ts(*q);
  ASSERT_EQ(ts.size(), q->queued_records());
  // What is left is the newest, contiguous up to the last push.
  for (std::size_t i = 0; i < ts.size(); ++i)
    EXPECT_EQ(ts[i], n - static_cast<std::int64_t>(ts.size()) + 1 + static_cast<std::int64_t>(i));
  // The files themselves stay within the limit (the WAL is checkpointed and truncated).
  std::error_code ec;
  const auto on_disk =
      fs::file_size(d.path / "queue.db") + fs::file_size(d.path / "queue.db-wal", ec);
  EXPECT_LE(on_disk, qc.max_size + qc.max_size / 8) << on_disk;
  // Not wastefully: most of the budget is used.
  EXPECT_GT(q->size_on_disk(), qc.max_size / 2);
}

// The loop's work compiles no SQL: pushes, batches, acks and the periodic limits reuse prepared
// statements. The size limit is SQLite's page limit, not a PRAGMA page_count after every push
// (a PRAGMA is compiled again at every step). Past the limit, making room may compile.
TEST(Queue, TheLoopsWorkCompilesNoSql) {
  TempDir d;
  tb::config::QueueConfig qc;
  qc.max_size = 1 << 20;
  auto q = open_queue(d.path, qc);
  std::string err;
  const std::uint64_t compiled = q->sql_compilations();
  EXPECT_GT(compiled, 0u) << "the counter counts nothing";
  for (int i = 1; i <= 200; ++i) {
    ASSERT_TRUE(q->push_all(std::vector<Record>{rec(2 * i), rec(2 * i + 1)}, &err)) << err;
    if (i % 10 == 0) {
      ASSERT_TRUE(q->ack(q->next_batch(4096), &err)) << err;
    }
    if (i % 50 == 0) {
      EXPECT_EQ(q->enforce_limits(2 * i), 0u);
    }
  }
  EXPECT_EQ(q->sql_compilations(), compiled);
  EXPECT_EQ(q->dropped_readings(), 0u);
}

// A push that cannot fit even in an empty queue is refused, and drops nothing for it; a full
// file system is not taken for a full queue either (FullDiskFailsCleanlyAndRecovers).
TEST(Queue, APushLargerThanMaxSizeIsRefusedAndDropsNothing) {
  TempDir d;
  tb::config::QueueConfig qc;
  qc.max_size = 64 << 10;  // the smallest allowed
  auto q = open_queue(d.path, qc);
  std::string err;
  for (int i = 1; i <= 3; ++i) ASSERT_TRUE(q->push(rec(i), &err)) << err;
  std::vector<Record> big;
  for (int i = 10; i < 30; ++i) big.push_back(rec(i, 4, 1000));  // ~80 KB
  EXPECT_FALSE(q->push_all(big, &err));
  EXPECT_NE(err.find("cannot fit in queue.max_size"), std::string::npos) << err;
  EXPECT_EQ(all_ts(*q), (std::vector<std::int64_t>{1, 2, 3}));
  EXPECT_EQ(q->dropped_readings(), 0u);
  // What fits goes in, the oldest making room as usual.
  big.resize(4);
  for (int round = 0; round < 5; ++round) ASSERT_TRUE(q->push_all(big, &err)) << err;
  EXPECT_LE(q->size_on_disk(), qc.max_size);
  EXPECT_GT(q->dropped_readings(), 0u);
  EXPECT_EQ(all_ts(*q).back(), 13);
}

TEST(Queue, LoweredMaxSizeIsEnforcedByEnforceLimits) {
  TempDir d;
  auto q = open_queue(d.path);
  std::string err;
  const int n = 4000;
  for (int i = 1; i <= n; ++i) ASSERT_TRUE(q->push(rec(i, 2, 50), &err));
  tb::config::QueueConfig qc;
  qc.max_size = 256 << 10;  // the records take about twice that
  q->set_limits(qc);
  const std::uint64_t dropped = q->enforce_limits(n);
  EXPECT_GT(dropped, 0u);
  EXPECT_EQ(dropped, q->dropped_readings());
  EXPECT_LE(q->size_on_disk(), qc.max_size);
  EXPECT_EQ(q->queued_readings() + dropped, 3u * n);
  const auto ts = all_ts(*q);
  ASSERT_FALSE(ts.empty());
  EXPECT_EQ(ts.back(), n);
  EXPECT_EQ(ts.front(), n - static_cast<std::int64_t>(ts.size()) + 1);
  // Not more than needed: a good part of the records remain.
  EXPECT_GT(ts.size(), static_cast<std::size_t>(n) / 4);
}

TEST(Queue, GarbageFileIsMovedAside) {
  TempDir d;
  {
    std::ofstream f(d.path / "queue.db", std::ios::binary);
    for (int i = 0; i < 1000; ++i) f << "this is not a database ";
  }
  std::string warning;
  auto q = open_queue(d.path, {}, &warning);
  EXPECT_NE(warning.find("moved it aside"), std::string::npos) << warning;
  EXPECT_NE(warning.find("not a database"), std::string::npos) << warning;
  EXPECT_EQ(aside_files(d.path).size(), 1u);
  std::string err;
  ASSERT_TRUE(q->push(rec(1), &err)) << err;
  EXPECT_EQ(q->queued_records(), 1u);
}

TEST(Queue, DamagedPagesAreMovedAside) {
  TempDir d;
  std::string err;
  {
    auto q = open_queue(d.path);
    for (int i = 1; i <= 500; ++i) ASSERT_TRUE(q->push(rec(i, 3, 20), &err));
  }
  {
    // Keep the header (page 1) intact so only quick_check can tell.
    std::fstream f(d.path / "queue.db", std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(4096 + 100);
    const std::string junk(8000, '\xA5');
    f.write(junk.data(), static_cast<std::streamsize>(junk.size()));
  }
  std::string warning;
  auto q = open_queue(d.path, {}, &warning);
  EXPECT_NE(warning.find("moved it aside"), std::string::npos) << warning;
  EXPECT_EQ(aside_files(d.path).size(), 1u);
  EXPECT_EQ(q->queued_records(), 0u);
  ASSERT_TRUE(q->push(rec(1), &err)) << err;
}

TEST(Queue, IncompatibleVersionIsMovedAside) {
  TempDir d;
  { auto q = open_queue(d.path); }
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((d.path / "queue.db").c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "PRAGMA user_version = 99", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(db);
  std::string warning;
  auto q = open_queue(d.path, {}, &warning);
  EXPECT_NE(warning.find("schema version 99"), std::string::npos) << warning;
  const auto aside = aside_files(d.path);
  ASSERT_GE(aside.size(), 1u);
  std::string err;
  ASSERT_TRUE(q->push(rec(1), &err)) << err;
}

TEST(Queue, ForeignDatabaseIsMovedAside) {
  TempDir d;
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((d.path / "queue.db").c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "CREATE TABLE t(x)", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(db);
  std::string warning;
  auto q = open_queue(d.path, {}, &warning);
  EXPECT_NE(warning.find("not a tb-agent queue"), std::string::npos) << warning;
  std::string err;
  ASSERT_TRUE(q->push(rec(1), &err)) << err;
}

TEST(Queue, FullDiskFailsCleanlyAndRecovers) {
  TempDir d;
  if (!mount_tmpfs(d.path, "256k"))
    GTEST_SKIP() << "cannot mount a tmpfs: " << std::strerror(errno);
  auto q = open_queue(d.path);
  std::string err;
  ASSERT_TRUE(q->push(rec(1), &err)) << err;
  {
    // Leave little room; whatever does not fit in the filler is fine.
    std::ofstream f(d.path / "filler", std::ios::binary);
    const std::string block(4096, 'f');
    for (int i = 0; i < 64 && f; ++i) f.write(block.data(), block.size());
  }
  int ok = 1;
  bool failed = false;
  for (int i = 2; i < 5000; ++i) {
    if (!q->push(rec(i, 4, 200), &err)) {
      failed = true;
      break;
    }
    ++ok;
  }
  ASSERT_TRUE(failed) << "the tmpfs never filled up";
  EXPECT_NE(err.find("full"), std::string::npos) << err;
  EXPECT_EQ(q->queued_records(), static_cast<std::uint64_t>(ok));
  fs::remove(d.path / "filler");
  ASSERT_TRUE(q->push(rec(100000), &err)) << err;
  EXPECT_EQ(q->queued_records(), static_cast<std::uint64_t>(ok + 1));
  // Everything that push() accepted is readable.
  EXPECT_EQ(all_ts(*q).size(), static_cast<std::size_t>(ok + 1));
  q.reset();
  umount2(d.path.c_str(), MNT_DETACH);
}

TEST(Queue, ReadOnlyStateDirFailsCleanlyAndRecovers) {
  TempDir d;
  if (!mount_tmpfs(d.path, "1m")) GTEST_SKIP() << "cannot mount a tmpfs: " << std::strerror(errno);
  std::string err;
  {
    auto q = open_queue(d.path);
    for (int i = 1; i <= 3; ++i) ASSERT_TRUE(q->push(rec(i), &err));
  }
  ASSERT_EQ(mount("tmpfs", d.path.c_str(), "tmpfs", MS_REMOUNT | MS_RDONLY, "size=1m"), 0)
      << std::strerror(errno);
  std::string warning;
  auto q = open_queue(d.path, {}, &warning);
  ASSERT_TRUE(q);
  EXPECT_FALSE(q->push(rec(4), &err));
  EXPECT_NE(err.find("ead-only"), std::string::npos) << err;  // "Read-only file system"
  EXPECT_FALSE(q->push(rec(5), &err));
  ASSERT_EQ(mount("tmpfs", d.path.c_str(), "tmpfs", MS_REMOUNT, "size=1m"), 0)
      << std::strerror(errno);
  ASSERT_TRUE(q->push(rec(6), &err)) << err;
  EXPECT_EQ(q->queued_records(), 4u);
  EXPECT_EQ(all_ts(*q), (std::vector<std::int64_t>{1, 2, 3, 6}));
  q.reset();
  umount2(d.path.c_str(), MNT_DETACH);
}

TEST(Queue, UnusableStateDirStillGivesAQueue) {
  TempDir d;
  fs::create_directory(d.path / "queue.db");  // a directory where the file should be
  std::string warning, err;
  auto q = Queue::open(d.path, {}, &warning, &err);
  ASSERT_TRUE(q) << err;
  EXPECT_NE(warning.find("unavailable"), std::string::npos) << warning;
  EXPECT_FALSE(q->push(rec(1), &err));
  EXPECT_FALSE(err.empty());
  EXPECT_TRUE(q->next_batch(1024).empty());
  EXPECT_EQ(q->enforce_limits(0), 0u);
  fs::remove(d.path / "queue.db");
  ASSERT_TRUE(q->push(rec(1), &err)) << err;
  EXPECT_EQ(q->queued_records(), 1u);
}

// kill -9 at random moments while pushing and acking: every record whose push() returned true
// (and that was not about to be acked) is there after a restart.
TEST(Queue, EveryAcceptedRecordSurvivesKill9) {
  TempDir d;
  std::mt19937 rng(20261125);
  std::set<std::int64_t> pushed, maybe_acked;
  for (int round = 0; round < 20; ++round) {
    int fds[2];
    ASSERT_EQ(pipe(fds), 0);
    const QueueOptions opt{round % 2 ? Sync::Normal : Sync::Full};
    const pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      close(fds[0]);
      std::string w, e;
      auto q = Queue::open(d.path, {}, opt, &w, &e);
      if (!q) _exit(2);
      for (std::int64_t i = 0;; ++i) {
        const std::int64_t ts = (round + 1) * 1000000 + i;
        if (!q->push(rec(ts), &e)) _exit(3);
        const std::string line = "P " + std::to_string(ts) + "\n";
        if (write(fds[1], line.data(), line.size()) < 0) _exit(4);
        if (i % 7 == 6) {
          Batch b = q->next_batch(200);
          std::string a = "A";
          for (const auto& el : nlohmann::json::parse(b.payload))
            a += " " + std::to_string(el["ts"].get<std::int64_t>());
          a += "\n";
          // Announced before: a kill between the commit and this line must not look like loss.
          if (write(fds[1], a.data(), a.size()) < 0) _exit(4);
          if (!q->ack(b, &e)) _exit(5);
        }
      }
    }
    close(fds[1]);
    std::this_thread::sleep_for(std::chrono::milliseconds(100 + rng() % 400));
    kill(child, SIGKILL);
    int status = 0;
    waitpid(child, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status)) << "child exited early with " << WEXITSTATUS(status);
    std::string text;
    char buf[4096];
    for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;)
      text.append(buf, static_cast<std::size_t>(n));
    close(fds[0]);
    std::istringstream in(text);
    std::string line;
    std::size_t round_pushed = 0;
    while (std::getline(in, line)) {
      // Lines are shorter than PIPE_BUF, so each write() arrived whole or not at all.
      std::istringstream ls(line);
      std::string kind;
      ls >> kind;
      std::int64_t ts;
      while (ls >> ts) {
        if (kind == "P") {
          pushed.insert(ts);
          ++round_pushed;
        } else {
          maybe_acked.insert(ts);
        }
      }
    }
    EXPECT_GT(round_pushed, 0u) << "round " << round;

    auto q = open_queue(d.path);
    const auto present = all_ts(*q);
    const std::set<std::int64_t> have(present.begin(), present.end());
    for (const auto ts : pushed) {
      if (!maybe_acked.count(ts)) {
        EXPECT_TRUE(have.count(ts)) << "lost ts " << ts << " in round " << round;
      }
    }
    EXPECT_EQ(q->queued_records(), present.size());
  }
  std::printf("kill -9: %zu records accepted over 20 rounds, %zu of them announced for ack\n",
              pushed.size(), maybe_acked.size());
}

// Several batches in flight (daemon::Uploader) are acked in the order their answers come. An ack
// removes exactly its batch: after a kill -9 (no destructor, no close) the queue holds exactly
// the batches not acked, each record once, with its payload unchanged.
TEST(Queue, AcksInAnyOrderRemoveExactlyTheirBatchesAcrossKill9) {
  TempDir d;
  std::string err;
  std::vector<Batch> batches;
  {
    auto q = open_queue(d.path);
    for (int i = 0; i < 40; ++i) ASSERT_TRUE(q->push(rec(5100 + i), &err)) << err;
    const std::size_t ten = encode_records({rec(5100), rec(5101), rec(5102), rec(5103), rec(5104),
                                            rec(5105), rec(5106), rec(5107), rec(5108), rec(5109)})
                                .size();
    for (int i = 0; i < 4; ++i) batches.push_back(q->next_batch(ten));
  }
  for (const auto& b : batches) ASSERT_EQ(b.ids.size(), 10u);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    std::string w, e;
    auto q = Queue::open(d.path, {}, {Sync::Normal}, &w, &e);
    if (!q) _exit(2);
    std::vector<Batch> taken;
    for (int i = 0; i < 4; ++i) taken.push_back(q->next_batch(batches[0].payload.size()));
    // Answers came back 3rd, 1st; the 2nd and 4th are still in flight when the agent dies.
    if (!q->ack(taken[2], &e) || !q->ack(taken[0], &e)) _exit(3);
    kill(getpid(), SIGKILL);
    _exit(4);
  }
  int status = 0;
  waitpid(child, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status)) << WEXITSTATUS(status);
  auto q = open_queue(d.path);
  EXPECT_EQ(q->queued_records(), 20u);
  Batch rest = q->next_batch(1 << 20);
  std::vector<std::int64_t> expect_ids = batches[1].ids;
  expect_ids.insert(expect_ids.end(), batches[3].ids.begin(), batches[3].ids.end());
  EXPECT_EQ(rest.ids, expect_ids);
  EXPECT_EQ(rest.payload, "[" + batches[1].payload.substr(1, batches[1].payload.size() - 2) + "," +
                              batches[3].payload.substr(1));
}

// next_batch starts its scan past the records in flight at the head of the queue; a record that
// becomes available behind that point (a release, or a push that reuses the id of a deleted last
// row) must still be handed out, oldest first.
TEST(Queue, RecordsAvailableBehindTheInFlightHeadAreNotSkipped) {
  TempDir d;
  auto q = open_queue(d.path);
  std::string err;
  for (int i = 0; i < 30; ++i) ASSERT_TRUE(q->push(rec(5100 + i), &err)) << err;
  const std::size_t ten = encode_records({rec(5100), rec(5101), rec(5102), rec(5103), rec(5104),
                                          rec(5105), rec(5106), rec(5107), rec(5108), rec(5109)})
                              .size();
  Batch b1 = q->next_batch(ten), b2 = q->next_batch(ten), b3 = q->next_batch(ten);
  ASSERT_EQ(b3.ids.size(), 10u);
  EXPECT_TRUE(q->next_batch(ten).empty());
  ASSERT_TRUE(q->ack(b3, &err)) << err;
  ASSERT_TRUE(q->push(rec(5200), &err)) << err;  // may get b3's first id again
  Batch fresh = q->next_batch(ten);
  EXPECT_EQ(fresh.payload, encode_records({rec(5200)}));
  q->release(b1);
  Batch again = q->next_batch(ten);
  EXPECT_EQ(again.ids, b1.ids);
  q->release(b2);
  q->release(fresh);
  EXPECT_EQ(q->next_batch(1 << 20).ids.size(), 11u);
}

// The uploader acks the answers of one loop wake-up together (docs/performance.md, "Coalesced
// acks"): ack_all removes exactly those batches in one transaction, so the WAL takes one set of
// frames for them, not one per batch — what made acks most of the drain's writes.
TEST(Queue, AckAllRemovesExactlyItsBatchesInOneTransaction) {
  const auto fill_and_take = [](Queue& q, std::vector<Batch>* out) {
    std::string err;
    for (int i = 0; i < 50; ++i) ASSERT_TRUE(q.push(rec(5100 + i), &err)) << err;
    const std::size_t ten = encode_records({rec(5100), rec(5101), rec(5102), rec(5103), rec(5104),
                                            rec(5105), rec(5106), rec(5107), rec(5108), rec(5109)})
                                .size();
    for (int i = 0; i < 5; ++i) out->push_back(q.next_batch(ten));
    for (const auto& b : *out) ASSERT_EQ(b.ids.size(), 10u);
  };
  const auto wal_size = [](const fs::path& dir) { return fs::file_size(dir / "queue.db-wal"); };
  std::string err;

  TempDir one_by_one;
  std::uintmax_t separate = 0;
  {
    auto q = open_queue(one_by_one.path);
    std::vector<Batch> b;
    fill_and_take(*q, &b);
    const auto before = wal_size(one_by_one.path);
    for (const int i : {0, 1, 3, 4}) ASSERT_TRUE(q->ack(b[i], &err)) << err;
    separate = wal_size(one_by_one.path) - before;
  }

  TempDir together;
  auto q = open_queue(together.path);
  std::vector<Batch> b;
  fill_and_take(*q, &b);
  const auto before = wal_size(together.path);
  ASSERT_TRUE(q->ack_all({&b[0], &b[1], &b[3], &b[4]}, &err)) << err;
  const auto coalesced = wal_size(together.path) - before;
  EXPECT_LT(coalesced * 2, separate)
      << "one transaction: " << coalesced << " WAL bytes, four: " << separate;
  EXPECT_EQ(q->queued_records(), 10u);
  EXPECT_EQ(q->queued_readings(), 20u);
  q->release(b[2]);
  EXPECT_EQ(q->next_batch(1 << 20).ids, b[2].ids);
}
