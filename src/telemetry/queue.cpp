// The durable queue on SQLite. Design, guarantees and limits for users: docs/queue.md.
#include "telemetry/queue.hpp"

#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <limits>
#include <unordered_set>

#include <spdlog/spdlog.h>

#include "util/fs.hpp"

namespace tb::telemetry {

namespace {

namespace fs = std::filesystem;

// Bump when the table layout changes; a file with another version is moved aside, not migrated
// (a queue is transient data: draining it with an old agent is the upgrade path).
constexpr int kSchemaVersion = 1;

// auto_vacuum must be chosen before the first table exists; INCREMENTAL lets enforce_limits give
// freed pages back to the file system so queue.max_size measures something real.
constexpr const char* kCreateSchema = R"sql(
CREATE TABLE records(
  id INTEGER PRIMARY KEY,
  ts INTEGER NOT NULL,
  values_json TEXT NOT NULL,
  readings INTEGER NOT NULL,
  bytes INTEGER NOT NULL
);
CREATE INDEX records_ts ON records(ts);
PRAGMA user_version = 1;
)sql";

enum class Connect { Ok, Corrupt, Failed };

bool is_corruption(int rc) {
  const int p = rc & 0xff;
  return p == SQLITE_CORRUPT || p == SQLITE_NOTADB;
}

// Errors after which the connection may be unusable until reopened: the file system went
// read-only, the file vanished or the disk failed. SQLITE_FULL is not one: the same connection
// works again once there is space.
bool needs_reconnect(int rc) {
  const int p = rc & 0xff;
  return p == SQLITE_READONLY || p == SQLITE_CANTOPEN || p == SQLITE_IOERR || is_corruption(rc);
}

class SqliteQueue final : public Queue {
 public:
  SqliteQueue(fs::path dir, const config::QueueConfig& limits, const QueueOptions& options)
      : dir_(std::move(dir)), path_(dir_ / "queue.db"), limits_(limits), options_(options) {}
  ~SqliteQueue() override { disconnect(); }
  SqliteQueue(const SqliteQueue&) = delete;
  SqliteQueue& operator=(const SqliteQueue&) = delete;

  // Opens the database; a corrupt or incompatible file is moved aside and a fresh one created.
  // Returns false (with *error) when the file cannot be used at all right now.
  bool connect(bool check, std::string* warning, std::string* error) {
    std::string reason;
    Connect c = try_connect(check, &reason, error);
    if (c == Connect::Corrupt) {
      disconnect();
      if (!move_aside(reason, warning, error)) return false;
      c = try_connect(false, &reason, error);
      if (c == Connect::Corrupt && error) *error = "fresh queue " + path_.string() + ": " + reason;
    }
    if (c != Connect::Ok) {
      disconnect();
      return false;
    }
    broken_ = false;
    hold_size_limit();
    return true;
  }

  bool push(const Record& record, std::string* error) override {
    return push_all(std::span<const Record>(&record, 1), error);
  }

  bool push_all(std::span<const Record> records, std::string* error) override {
    std::vector<Row> rows;
    rows.reserve(records.size());
    for (const auto& record : records) {
      std::size_t n = 0;
      std::string values = encode_values(record.readings, &n);
      // Nothing ThingsBoard could store (no readings, or only NaN/Inf): nothing to keep.
      if (n > 0) rows.push_back({record.ts_ms, std::move(values), n});
    }
    if (rows.empty()) return true;
    if (!ready(error)) return false;
    Stored stored;
    int rc = insert(rows, &stored, error);
    if ((rc & 0xff) == SQLITE_FULL && at_size_limit(stored.bytes)) {
      // queue.max_size, not the disk (PRAGMA max_page_count, set_page_limit): make room by
      // dropping the oldest records, then store the push. Its own records are never dropped, and
      // nothing is dropped for a push that could not fit even in an empty queue.
      if (2 * stored.bytes > db_budget()) {
        if (error)
          *error = "cannot store readings in " + path_.string() + ": " +
                   std::to_string(stored.bytes) + " bytes of records cannot fit in queue.max_size";
        return false;
      }
      dropped_ += enforce_size(std::min(room_for(stored.bytes), db_budget()), 0);
      rc = insert(rows, &stored, error);
    }
    if (rc != SQLITE_DONE) return false;
    // SQLite may reuse the id of a deleted last row: the scan must see it.
    scan_from_ = std::min(scan_from_, stored.first_id);
    queued_records_ += rows.size();
    queued_readings_ += stored.readings;
    stored_bytes_ += stored.bytes;
    // Durable before it returns (Sync::Full): the committed frames reach the disk now. The
    // records are queued either way; a failed sync is still reported, as the disk's failure.
    return options_.sync != Sync::Full || sync_wal(error);
  }

  Batch next_batch(std::uint64_t max_bytes) override {
    Batch b;
    if (!ready(nullptr)) return b;
    const bool oldest = limits_.order != config::DrainOrder::NewestFirst;
    sqlite3_stmt* s = oldest ? oldest_ : newest_;
    // Oldest first, the scan starts past the records in flight at the head of the queue: with
    // many batches out at once (delivery.max_in_flight) stepping over them was most of the cost.
    if (oldest) sqlite3_bind_int64(s, 1, scan_from_);
    b.payload = "[";
    int rc;
    std::int64_t next_free = -1;  // the first record neither in flight nor taken, if any
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
      const std::int64_t id = sqlite3_column_int64(s, 0);
      if (in_flight_.count(id)) continue;
      next_free = id;
      const std::int64_t ts = sqlite3_column_int64(s, 1);
      if (ts < hold_before_) continue;  // stamped while the clock was not set: held
      const auto* text = reinterpret_cast<const char*>(sqlite3_column_text(s, 2));
      const auto len = static_cast<std::size_t>(sqlite3_column_bytes(s, 2));
      const std::size_t add = record_size(ts, len) + (b.ids.empty() ? 0 : 1);
      // +1 for the closing bracket. The first record goes in whatever its size: a record that
      // never fits must still leave (as Block1, or dropped on 4.00), not block the queue.
      if (!b.ids.empty() && b.payload.size() + add + 1 > max_bytes) break;
      next_free = -1;
      if (!b.ids.empty()) b.payload += ',';
      append_record(b.payload, ts, std::string_view(text ? text : "", len));
      b.ids.push_back(id);
      b.readings += static_cast<std::uint64_t>(sqlite3_column_int64(s, 3));
    }
    sqlite3_reset(s);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
      std::string ignored;
      fail(rc, "cannot read", &ignored);
      return Batch{};
    }
    if (oldest) {
      // Every record before next_free is in flight now (or there is none after the batch).
      if (next_free >= 0)
        scan_from_ = next_free;
      else if (!b.ids.empty())
        scan_from_ = std::max(scan_from_, b.ids.back() + 1);
    }
    if (b.ids.empty()) return Batch{};
    b.payload += ']';
    in_flight_.insert(b.ids.begin(), b.ids.end());
    return b;
  }

  bool ack(const Batch& batch, std::string* error) override {
    return remove({&batch}, false, error);
  }
  bool ack_all(const std::vector<const Batch*>& batches, std::string* error) override {
    return remove(batches, false, error);
  }

  void release(const Batch& batch) override {
    for (const auto id : batch.ids) {
      in_flight_.erase(id);
      scan_from_ = std::min(scan_from_, id);
    }
  }

  bool drop(const Batch& batch, std::string* error) override {
    return remove({&batch}, true, error);
  }

  std::uint64_t enforce_limits(std::int64_t now_ms) override {
    if (!ready(nullptr)) return 0;
    std::uint64_t n = 0;
    const std::int64_t age = limits_.max_age.count();
    if (age > 0 && now_ms > std::numeric_limits<std::int64_t>::min() + age) {
      sqlite3_bind_int64(delete_older_, 1, now_ms - age);
      n += delete_returning(delete_older_);
    }
    dropped_ += n;
    // The size is held by SQLite's page limit between pushes and measured only when the limit is
    // set (open, set_limits), not here every minute: that would compile PRAGMA page_count in the
    // loop. What those measurements dropped is reported here.
    n += std::exchange(dropped_by_new_limit_, 0);
    return n;
  }

  void set_limits(const config::QueueConfig& limits) override {
    limits_ = limits;
    if (db_) {
      apply_wal_limit();
      hold_size_limit();
    }
  }

  std::int64_t last_id() override {
    std::int64_t id = 0;
    if (ready(nullptr)) query_int("SELECT coalesce(max(id), 0) FROM records", &id);
    return id;
  }

  bool shift_ts(std::int64_t after_id, std::int64_t delta_ms, std::uint64_t* moved,
                std::string* error) override {
    if (!ready(error)) return false;
    sqlite3_stmt* s = nullptr;
    int rc =
        sqlite3_prepare_v2(db_, "UPDATE records SET ts = ts + ? WHERE id > ?", -1, &s, nullptr);
    if (rc == SQLITE_OK) {
      sqlite3_bind_int64(s, 1, delta_ms);
      sqlite3_bind_int64(s, 2, after_id);
      rc = sqlite3_step(s);
    }
    sqlite3_finalize(s);
    if (rc != SQLITE_DONE) return fail(rc, "cannot re-stamp readings in", error);
    if (moved) *moved = static_cast<std::uint64_t>(sqlite3_changes(db_));
    return true;
  }

  void hold_before(std::int64_t ts_ms) override { hold_before_ = ts_ms; }

  bool recreate_file(std::string* error) override {
    if (!ready(error)) return false;
    // The open connection still reads the deleted file: attach a new one at the old path (SQLite
    // creates it), copy the records with their ids, then reopen on the new file.
    sqlite3_stmt* s = nullptr;
    int rc = sqlite3_prepare_v2(db_, "ATTACH DATABASE ? AS fresh", -1, &s, nullptr);
    if (rc == SQLITE_OK) {
      sqlite3_bind_text(s, 1, path_.c_str(), -1, SQLITE_TRANSIENT);
      rc = sqlite3_step(s);
    }
    sqlite3_finalize(s);
    if (rc != SQLITE_DONE) return fail(rc, "cannot make anew", error);
    constexpr const char* kCopy = R"sql(
PRAGMA fresh.auto_vacuum = INCREMENTAL;
BEGIN;
CREATE TABLE fresh.records(
  id INTEGER PRIMARY KEY,
  ts INTEGER NOT NULL,
  values_json TEXT NOT NULL,
  readings INTEGER NOT NULL,
  bytes INTEGER NOT NULL
);
CREATE INDEX fresh.records_ts ON records(ts);
INSERT INTO fresh.records SELECT id, ts, values_json, readings, bytes FROM main.records;
PRAGMA fresh.user_version = 1;
COMMIT;
)sql";
    static_assert(kSchemaVersion == 1, "kCopy creates schema version 1");
    rc = exec(kCopy);
    if (rc != SQLITE_OK) {
      const std::string msg = errmsg();
      exec("ROLLBACK");
      exec("DETACH DATABASE fresh");
      if (error) *error = "cannot copy the queue into a new " + path_.string() + ": " + msg;
      return false;
    }
    exec("DETACH DATABASE fresh");
    disconnect();
    std::string warning;
    return connect(false, &warning, error);
  }

  std::uint64_t queued_readings() const override { return queued_readings_; }
  std::uint64_t queued_records() const override { return queued_records_; }
  std::uint64_t dropped_readings() const override { return dropped_; }
  std::uint64_t size_on_disk() override { return db_ ? page_bytes() + wal_allowance() : 0; }
  fs::path path() const override { return path_; }
  std::uint64_t sql_compilations() const override { return compilations_; }

 private:
  // --- connection -------------------------------------------------------------------------

  Connect try_connect(bool check, std::string* reason, std::string* error) {
    // No page-cache bulk: SQLite otherwise allocates 20 pages (~87 KiB) at the first read, before
    // the cache_size below applies (loading the schema comes first), and keeps them. Process-wide,
    // effective only before SQLite's initialisation (the first open); later calls are refused
    // (SQLITE_MISUSE) and change nothing.
    static const bool no_bulk [[maybe_unused]] =
        sqlite3_config(SQLITE_CONFIG_PAGECACHE, nullptr, 0, 0) == SQLITE_OK;
    int rc =
        sqlite3_open_v2(path_.c_str(), &db_,
                        SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nullptr);
    if (rc != SQLITE_OK) return failed(rc, "cannot open", error);
    sqlite3_extended_result_codes(db_, 1);
    // Called while a statement is compiled, never while one runs: a count of compilations
    // (a statement's own action, not the columns and functions it reads).
    sqlite3_set_authorizer(
        db_,
        [](void* count, int action, const char*, const char*, const char*, const char*) noexcept {
          if (action != SQLITE_READ && action != SQLITE_FUNCTION)
            ++*static_cast<std::uint64_t*>(count);
          return SQLITE_OK;
        },
        &compilations_);
    // A brief wait rather than an instant SQLITE_BUSY if the file is locked by someone else.
    sqlite3_busy_timeout(db_, 2000);
    // One agent owns its queue. Exclusive locking takes the file locks once instead of ~8 fcntl
    // calls per transaction (half the cost of a push here), keeps the WAL index in heap memory
    // (no -shm), and makes a second agent on the same state_dir fail instead of interleave.
    exec("PRAGMA locking_mode = EXCLUSIVE");
    // Set before the first read: the start-up quick_check reads every page of a backlog through
    // this cache, and the heap it grows stays grown. Batches are read sequentially, so a small
    // cache costs the drain nothing measurable (bench/drain_bench.cpp) and keeps RSS low.
    exec("PRAGMA cache_size = -64");

    // The first read of the file: "file is not a database" shows up here.
    std::int64_t version = 0;
    rc = query_int("PRAGMA user_version", &version);
    if (is_corruption(rc))
      return corrupt(reason, std::string("is not readable (") + errmsg() + ")");
    if (rc != SQLITE_OK) return failed(rc, "cannot read", error);
    if (version == 0) {
      std::int64_t tables = 0;
      rc = query_int("SELECT count(*) FROM sqlite_master", &tables);
      if (is_corruption(rc))
        return corrupt(reason, std::string("is not readable (") + errmsg() + ")");
      if (rc != SQLITE_OK) return failed(rc, "cannot read", error);
      if (tables > 0)
        return corrupt(reason, "is not a tb-agent queue (it has tables but no version)");
      // A new file: auto_vacuum before any table exists, WAL before the first write.
      if ((rc = exec("PRAGMA auto_vacuum = INCREMENTAL")) != SQLITE_OK ||
          (rc = set_wal()) != SQLITE_OK || (rc = exec("BEGIN")) != SQLITE_OK ||
          (rc = exec(kCreateSchema)) != SQLITE_OK || (rc = exec("COMMIT")) != SQLITE_OK) {
        exec("ROLLBACK");
        return failed(rc, "cannot create", error);
      }
    } else if (version != kSchemaVersion) {
      return corrupt(reason, "has schema version " + std::to_string(version) +
                                 ", this tb-agent uses " + std::to_string(kSchemaVersion));
    } else {
      if (check) {
        std::string result;
        rc = quick_check(&result);
        if (is_corruption(rc)) return corrupt(reason, std::string("is corrupt (") + errmsg() + ")");
        if (rc != SQLITE_OK) return failed(rc, "cannot check", error);
        if (result != "ok") return corrupt(reason, "is corrupt (quick_check: " + result + ")");
      }
      rc = set_wal();
      // A read-only file system still lets us read the queue: keep going, pushes will report.
      if (is_corruption(rc)) return corrupt(reason, std::string("is corrupt (") + errmsg() + ")");
      if (rc != SQLITE_OK && (rc & 0xff) != SQLITE_READONLY)
        return failed(rc, "cannot open", error);
    }

    exec("PRAGMA temp_store = MEMORY");
    // Commits do not wait for the disk; push_all() syncs the WAL itself (sync_wal says why).
    exec("PRAGMA synchronous = NORMAL");
    apply_wal_limit();

    struct {
      sqlite3_stmt** stmt;
      const char* sql;
    } const stmts[] = {
        {&insert_, "INSERT INTO records(ts, values_json, readings, bytes) VALUES(?, ?, ?, ?)"},
        {&oldest_,
         "SELECT id, ts, values_json, readings FROM records WHERE id >= ? ORDER BY id ASC"},
        {&newest_, "SELECT id, ts, values_json, readings FROM records ORDER BY id DESC"},
        // Not DELETE … RETURNING: SQLite builds an ephemeral table for every RETURNING statement,
        // which was most of the cost of an ack while draining a backlog.
        {&select_one_, "SELECT readings, bytes FROM records WHERE id = ?"},
        {&delete_one_, "DELETE FROM records WHERE id = ?"},
        {&delete_older_, "DELETE FROM records WHERE ts < ? RETURNING id, readings, bytes"},
        {&delete_upto_, "DELETE FROM records WHERE id <= ? RETURNING id, readings, bytes"},
        {&prefix_, "SELECT id, bytes FROM records ORDER BY id ASC"},
        {&begin_, "BEGIN"},
        {&commit_, "COMMIT"},
        {&rollback_, "ROLLBACK"},
        {&page_count_, "PRAGMA page_count"},
        {&vacuum_, "PRAGMA incremental_vacuum"},
    };
    for (const auto& st : stmts) {
      rc = sqlite3_prepare_v3(db_, st.sql, -1, SQLITE_PREPARE_PERSISTENT, st.stmt, nullptr);
      if (is_corruption(rc) || (rc & 0xff) == SQLITE_ERROR)
        return corrupt(reason, std::string("does not have the expected tables (") + errmsg() + ")");
      if (rc != SQLITE_OK) return failed(rc, "cannot prepare statements on", error);
    }

    std::int64_t page_size = 4096;
    query_int("PRAGMA page_size", &page_size);
    page_size_ = static_cast<std::uint64_t>(page_size);

    sqlite3_stmt* totals = nullptr;
    rc = sqlite3_prepare_v2(db_, "SELECT count(*), total(readings), total(bytes) FROM records", -1,
                            &totals, nullptr);
    if (rc == SQLITE_OK) rc = sqlite3_step(totals);
    if (rc == SQLITE_ROW) {
      queued_records_ = static_cast<std::uint64_t>(sqlite3_column_int64(totals, 0));
      queued_readings_ = static_cast<std::uint64_t>(sqlite3_column_int64(totals, 1));
      stored_bytes_ = static_cast<std::uint64_t>(sqlite3_column_int64(totals, 2));
    }
    sqlite3_finalize(totals);
    if (is_corruption(rc)) return corrupt(reason, std::string("is corrupt (") + errmsg() + ")");
    if (rc != SQLITE_ROW) return failed(rc, "cannot count the records in", error);
    return Connect::Ok;
  }

  void disconnect() {
    for (sqlite3_stmt** s :
         {&insert_, &oldest_, &newest_, &select_one_, &delete_one_, &delete_older_, &delete_upto_,
          &prefix_, &begin_, &commit_, &rollback_, &page_count_, &vacuum_}) {
      sqlite3_finalize(*s);
      *s = nullptr;
    }
    if (db_) sqlite3_close_v2(db_);
    db_ = nullptr;
  }

  Connect failed(int rc, const char* what, std::string* error) {
    if (error) *error = describe(rc, what);
    return Connect::Failed;
  }

  static Connect corrupt(std::string* reason, std::string why) {
    *reason = std::move(why);
    return Connect::Corrupt;
  }

  // queue.db (and its -wal, -shm) → queue.db.corrupt-<unix-ts>: kept for a post-mortem, out of
  // the agent's way.
  bool move_aside(const std::string& reason, std::string* warning, std::string* error) {
    std::string base = path_.string() + ".corrupt-" + std::to_string(std::time(nullptr));
    std::error_code ec;
    for (int i = 1; fs::exists(base, ec); ++i) base += "." + std::to_string(i);
    if (std::rename(path_.c_str(), base.c_str()) != 0 && errno != ENOENT) {
      if (error)
        *error = "the telemetry queue " + path_.string() + " " + reason +
                 ", and it cannot be moved aside: " + std::strerror(errno);
      return false;
    }
    for (const char* suffix : {"-wal", "-shm"}) {
      const std::string from = path_.string() + suffix;
      if (std::rename(from.c_str(), (base + suffix).c_str()) != 0 && errno != ENOENT) {
        // A leftover WAL would be replayed into the fresh file: remove it rather than keep it.
        fs::remove(from, ec);
      }
    }
    if (warning) {
      if (!warning->empty()) *warning += "; ";
      *warning += "the telemetry queue " + path_.string() + " " + reason + "; moved it aside to " +
                  base + " and started a fresh queue";
    }
    return true;
  }

  // Before each operation: reopen after an error that may have left the connection unusable
  // (read-only remount, vanished file). This is what makes "works again when fixed" true.
  bool ready(std::string* error) {
    if (db_ && !broken_) return true;
    // quick_check only if the file looked corrupt: otherwise this may run on every push while
    // the disk is read-only, and a check reads the whole file.
    std::string warning, err;
    disconnect();
    const bool check = recheck_;
    recheck_ = false;
    const bool ok = connect(check, &warning, &err);
    // No caller to hand a warning to here (the file was moved aside): the log must say it.
    if (!warning.empty()) spdlog::warn("{}", warning);
    if (!ok && error) *error = err;
    return ok;
  }

  // --- helpers ----------------------------------------------------------------------------

  std::string errmsg() const { return db_ ? sqlite3_errmsg(db_) : "out of memory"; }

  std::string describe(int rc, const char* what) const {
    std::string msg = std::string(what) + " " + path_.string() + ": " + errmsg();
    // SQLite's "unable to open database file" hides the cause. On a read-only file system its
    // errno is often that of a failed -shm open (ENOENT), so ask the directory first.
    const int p = rc & 0xff;
    if ((p == SQLITE_CANTOPEN || p == SQLITE_READONLY || p == SQLITE_IOERR) &&
        ::access(dir_.c_str(), W_OK) != 0) {
      msg += ": " + dir_.string() + ": " + std::strerror(errno);
    } else if (const int e = db_ ? sqlite3_system_errno(db_) : 0; e != 0) {
      msg += std::string(": ") + std::strerror(e);
    }
    if (p == SQLITE_FULL)
      msg += " (the file system is full)";
    else if (p == SQLITE_READONLY)
      msg += " (the file system or file is read-only)";
    else if (p == SQLITE_CANTOPEN)
      msg += " (check that the state directory exists and is writable)";
    return msg;
  }

  bool fail(int rc, const char* what, std::string* error) {
    if (error) *error = describe(rc, what);
    if (needs_reconnect(rc)) broken_ = true;
    if (is_corruption(rc)) recheck_ = true;
    return false;
  }

  int exec(const char* sql) { return sqlite3_exec(db_, sql, nullptr, nullptr, nullptr); }

  int query_int(const char* sql, std::int64_t* out) {
    sqlite3_stmt* s = nullptr;
    int rc = sqlite3_prepare_v2(db_, sql, -1, &s, nullptr);
    if (rc == SQLITE_OK) {
      rc = sqlite3_step(s);
      if (rc == SQLITE_ROW) {
        *out = sqlite3_column_int64(s, 0);
        rc = SQLITE_OK;
      } else if (rc == SQLITE_DONE) {
        rc = SQLITE_OK;
      }
    }
    sqlite3_finalize(s);
    return rc;
  }

  int quick_check(std::string* result) {
    sqlite3_stmt* s = nullptr;
    int rc = sqlite3_prepare_v2(db_, "PRAGMA quick_check(1)", -1, &s, nullptr);
    if (rc == SQLITE_OK) rc = sqlite3_step(s);
    if (rc == SQLITE_ROW) {
      const auto* t = reinterpret_cast<const char*>(sqlite3_column_text(s, 0));
      *result = t ? t : "";
      rc = SQLITE_OK;
    }
    sqlite3_finalize(s);
    return rc;
  }

  int set_wal() {
    sqlite3_stmt* s = nullptr;
    int rc = sqlite3_prepare_v2(db_, "PRAGMA journal_mode = WAL", -1, &s, nullptr);
    if (rc == SQLITE_OK) rc = sqlite3_step(s);
    if (rc == SQLITE_ROW) {
      const auto* t = reinterpret_cast<const char*>(sqlite3_column_text(s, 0));
      rc = t && std::strcmp(t, "wal") == 0 ? SQLITE_OK : SQLITE_READONLY;
    }
    sqlite3_finalize(s);
    return rc;
  }

  // The WAL is part of what queue.max_size bounds: an eighth of it (16 pages to 8 MiB, never more
  // than half), the database file gets the rest. Checkpoints run when half of it is used, so
  // the WAL stays under journal_size_limit and is not truncated and regrown — on ext4 that
  // metadata churn made each checkpoint's fsync cost milliseconds.
  std::uint64_t wal_allowance() const {
    const std::uint64_t page = page_size_ ? page_size_ : 4096;
    std::uint64_t pages = std::clamp<std::uint64_t>(limits_.max_size / 8 / page, 16, 2000);
    pages = std::min(pages, limits_.max_size / 2 / page);
    return std::max<std::uint64_t>(pages, 2) * page;
  }

  std::uint64_t db_budget() const {
    const std::uint64_t wal = wal_allowance();
    return limits_.max_size > wal ? limits_.max_size - wal : 0;
  }

  void apply_wal_limit() {
    const std::uint64_t wal = wal_allowance();
    const std::string pages = std::to_string(wal / 2 / (page_size_ ? page_size_ : 4096));
    exec(("PRAGMA wal_autocheckpoint = " + pages).c_str());
    exec(("PRAGMA journal_size_limit = " + std::to_string(wal)).c_str());
  }

  std::uint64_t page_bytes() {
    std::int64_t pages = 0;
    if (sqlite3_step(page_count_) == SQLITE_ROW) pages = sqlite3_column_int64(page_count_, 0);
    sqlite3_reset(page_count_);
    return static_cast<std::uint64_t>(pages) * page_size_;
  }

  struct Row {
    std::int64_t ts_ms;
    std::string values;
    std::size_t readings;
  };
  struct Stored {
    std::int64_t first_id = std::numeric_limits<std::int64_t>::max();
    std::uint64_t readings = 0;
    std::uint64_t bytes = 0;  // record_size() of every row, stored or not
  };

  // Stores the rows: one statement (its own implicit transaction) for one, one commit for
  // several; all or nothing. Returns SQLITE_DONE, or the error (in *error) after rolling back.
  int insert(const std::vector<Row>& rows, Stored* out, std::string* error) {
    *out = Stored{};
    for (const auto& row : rows) out->bytes += record_size(row.ts_ms, row.values.size());
    const bool transaction = rows.size() > 1;
    int rc = SQLITE_DONE;
    if (transaction && (rc = step_simple(begin_)) != SQLITE_DONE) {
      fail(rc, "cannot store readings in", error);
      return rc;
    }
    for (const auto& row : rows) {
      sqlite3_stmt* s = insert_;
      sqlite3_bind_int64(s, 1, row.ts_ms);
      sqlite3_bind_text(s, 2, row.values.data(), static_cast<int>(row.values.size()),
                        SQLITE_STATIC);
      sqlite3_bind_int64(s, 3, static_cast<std::int64_t>(row.readings));
      sqlite3_bind_int64(s, 4,
                         static_cast<std::int64_t>(record_size(row.ts_ms, row.values.size())));
      rc = sqlite3_step(s);
      sqlite3_reset(s);
      sqlite3_clear_bindings(s);
      if (rc != SQLITE_DONE) break;
      out->first_id = std::min<std::int64_t>(out->first_id, sqlite3_last_insert_rowid(db_));
      out->readings += row.readings;
    }
    if (transaction && rc == SQLITE_DONE) rc = step_simple(commit_);
    if (rc != SQLITE_DONE) {
      fail(rc, "cannot store readings in", error);  // before the rollback replaces the message
      if (transaction) step_simple(rollback_);
    }
    return rc;
  }

  // A push must reach the disk before it returns; an ack or a limits delete need not: if one is
  // lost to a power cut the records are sent again with the same ts, which ThingsBoard
  // overwrites. Skipping that fsync is what makes draining fast. The connection stays at
  // synchronous = NORMAL (in WAL mode: no sync at commit) and a push syncs the WAL file after its
  // commit, which is what FULL would do inside it. Not by switching the PRAGMA per transaction:
  // SQLite applies PRAGMA synchronous when the statement is compiled, so a prepared one is
  // compiled again on every step, twice a second with a few sources (the SQL parser then stays
  // hot in CPU and memory, docs/performance.md).
  bool sync_wal(std::string* error) {
    sqlite3_file* wal = nullptr;
    if (sqlite3_file_control(db_, "main", SQLITE_FCNTL_JOURNAL_POINTER, &wal) != SQLITE_OK ||
        !wal || !wal->pMethods) {
      if (error)
        *error = "cannot flush the queued readings to disk in " + path_.string() +
                 ": its write-ahead log is not open";
      return false;
    }
    errno = 0;
    if (wal->pMethods->xSync(wal, SQLITE_SYNC_NORMAL) == SQLITE_OK) return true;
    const int e = errno;
    if (error)
      *error = "cannot flush the queued readings to disk in " + path_.string() +
               (e ? std::string(": ") + std::strerror(e) : std::string()) +
               " (they are queued, but a power cut may lose them)";
    return false;
  }

  int step_simple(sqlite3_stmt* s) {
    const int rc = sqlite3_step(s);
    sqlite3_reset(s);
    return rc;
  }

  // Runs a DELETE … RETURNING id, readings, bytes and books what it removed. Returns readings.
  std::uint64_t delete_returning(sqlite3_stmt* s) {
    std::uint64_t readings = 0, records = 0, bytes = 0;
    std::vector<std::int64_t> ids;
    int rc;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
      ids.push_back(sqlite3_column_int64(s, 0));
      readings += static_cast<std::uint64_t>(sqlite3_column_int64(s, 1));
      bytes += static_cast<std::uint64_t>(sqlite3_column_int64(s, 2));
      ++records;
    }
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    if (rc != SQLITE_DONE) {
      // The statement's implicit transaction was rolled back: nothing was removed.
      std::string ignored;
      fail(rc, "cannot delete from", &ignored);
      return 0;
    }
    // A record dropped while in flight: forget it, so its ack or drop finds nothing to count.
    for (const auto id : ids) in_flight_.erase(id);
    book_removed(records, readings, bytes);
    return readings;
  }

  void book_removed(std::uint64_t records, std::uint64_t readings, std::uint64_t bytes) {
    queued_records_ -= std::min(queued_records_, records);
    queued_readings_ -= std::min(queued_readings_, readings);
    stored_bytes_ -= std::min(stored_bytes_, bytes);
  }

  // A SQLITE_FULL is queue.max_size's when a push of `push_bytes` could have taken the file past
  // its page limit: records take their bytes and some b-tree overhead (counted twice here), and
  // splits of the table's and the index's trees a few pages more. Farther from it the disk is full,
  // and nothing is dropped for that (docs/queue.md, "queue.max_size").
  bool at_size_limit(std::uint64_t push_bytes) {
    return page_bytes() + room_for(push_bytes) >= db_budget();
  }
  std::uint64_t room_for(std::uint64_t push_bytes) const {
    return 2 * push_bytes + 4 * (page_size_ ? page_size_ : 4096);
  }

  // queue.max_size as SQLite's own limit on the file's pages: a write that would grow the file
  // past it fails with SQLITE_FULL, and push_all() makes room then. Checking the size after every
  // push instead (PRAGMA page_count) compiled that PRAGMA every time (SQLite runs a PRAGMA's
  // program once), which kept SQLite's parser in the loop (docs/performance.md). SQLite never
  // sets the limit below the file's current size; enforce_size() sets it again after shrinking.
  void set_page_limit() {
    const std::uint64_t page = page_size_ ? page_size_ : 4096;
    const std::uint64_t pages = std::max<std::uint64_t>(db_budget() / page, 1);
    exec(("PRAGMA max_page_count = " + std::to_string(pages)).c_str());
  }

  // A new queue.max_size (or a file opened with one): the file made to fit it, then held to it.
  void hold_size_limit() {
    const std::uint64_t n = enforce_size(0, 1);
    dropped_ += n;
    dropped_by_new_limit_ += n;
  }

  // Oldest records (by id) out until the file fits queue.max_size with `room` bytes to spare,
  // keeping at least the newest `keep` records. Returns readings dropped.
  std::uint64_t enforce_size(std::uint64_t room, std::uint64_t keep) {
    const std::uint64_t budget = db_budget();
    const std::uint64_t limit = budget > room ? budget - room : 0;
    std::uint64_t size = page_bytes();
    std::uint64_t dropped = 0;
    if (size > limit) {
      vacuum();  // pages freed by acks count as used until given back
      // Go 1/16 below the limit: a queue that stays full through a long outage would otherwise
      // pay a delete and a vacuum on every push.
      const std::uint64_t margin = budget / 16;
      const std::uint64_t low = limit > margin ? limit - margin : 0;
      while ((size = page_bytes()) > low && queued_records_ > keep) {
        // Rows and their b-tree overhead fill the pages roughly in proportion, so the excess in
        // file bytes scales to an excess in stored bytes; loop in case pages free up slower.
        const auto excess = static_cast<long double>(size - low);
        const auto target = std::max<std::uint64_t>(
            1, static_cast<std::uint64_t>(excess * static_cast<long double>(stored_bytes_) /
                                          static_cast<long double>(size)));
        std::int64_t cutoff = 0;
        std::uint64_t sum = 0, rows = 0;
        while (rows + keep < queued_records_ && sqlite3_step(prefix_) == SQLITE_ROW) {
          cutoff = sqlite3_column_int64(prefix_, 0);
          sum += static_cast<std::uint64_t>(sqlite3_column_int64(prefix_, 1));
          ++rows;
          if (sum >= target) break;
        }
        sqlite3_reset(prefix_);
        if (rows == 0) break;
        const std::uint64_t records_before = queued_records_;
        sqlite3_bind_int64(delete_upto_, 1, cutoff);
        dropped += delete_returning(delete_upto_);
        if (queued_records_ == records_before) break;  // the delete failed; do not spin
        vacuum();
      }
    }
    set_page_limit();
    return dropped;
  }

  void vacuum() {
    while (sqlite3_step(vacuum_) == SQLITE_ROW) {
    }
    sqlite3_reset(vacuum_);
  }

  // Removes the records of every batch in one transaction: all or nothing.
  bool remove(const std::vector<const Batch*>& batches, bool count_as_dropped, std::string* error) {
    const auto release_all = [&] {
      for (const Batch* b : batches) release(*b);
    };
    if (std::all_of(batches.begin(), batches.end(), [](const Batch* b) { return b->empty(); }))
      return true;
    if (!ready(error)) {
      release_all();
      return false;
    }
    std::uint64_t readings = 0, records = 0, bytes = 0;
    int rc = SQLITE_DONE;
    if ((rc = step_simple(begin_)) == SQLITE_DONE) {
      for (const Batch* batch : batches) {
        for (const auto id : batch->ids) {
          // A record the limits already removed is simply not there: nothing to count.
          sqlite3_bind_int64(select_one_, 1, id);
          rc = sqlite3_step(select_one_);
          const bool present = rc == SQLITE_ROW;
          if (present) {
            readings += static_cast<std::uint64_t>(sqlite3_column_int64(select_one_, 0));
            bytes += static_cast<std::uint64_t>(sqlite3_column_int64(select_one_, 1));
            ++records;
            rc = SQLITE_DONE;
          }
          sqlite3_reset(select_one_);
          if (rc != SQLITE_DONE) break;
          if (!present) continue;
          sqlite3_bind_int64(delete_one_, 1, id);
          rc = sqlite3_step(delete_one_);
          sqlite3_reset(delete_one_);
          if (rc != SQLITE_DONE) break;
        }
        if (rc != SQLITE_DONE) break;
      }
      if (rc == SQLITE_DONE) rc = step_simple(commit_);
      if (rc != SQLITE_DONE) step_simple(rollback_);
    }
    // Whatever happened, these ids are no longer handed out: on failure they go out again.
    if (rc != SQLITE_DONE) {
      release_all();
      return fail(rc, "cannot remove delivered records from", error);
    }
    for (const Batch* batch : batches)
      for (const auto id : batch->ids) in_flight_.erase(id);  // gone: the scan need not look back
    book_removed(records, readings, bytes);
    if (count_as_dropped) dropped_ += readings;
    return true;
  }

  fs::path dir_;
  fs::path path_;
  config::QueueConfig limits_;
  QueueOptions options_;

  sqlite3* db_ = nullptr;
  bool broken_ = false;   // reopen before the next operation
  bool recheck_ = false;  // ...and run quick_check then (a runtime error said "corrupt")
  std::uint64_t page_size_ = 4096;

  std::int64_t hold_before_ = 0;
  sqlite3_stmt* insert_ = nullptr;
  sqlite3_stmt* oldest_ = nullptr;
  sqlite3_stmt* newest_ = nullptr;
  sqlite3_stmt* select_one_ = nullptr;
  sqlite3_stmt* delete_one_ = nullptr;
  sqlite3_stmt* delete_older_ = nullptr;
  sqlite3_stmt* delete_upto_ = nullptr;
  sqlite3_stmt* prefix_ = nullptr;
  sqlite3_stmt* begin_ = nullptr;
  sqlite3_stmt* commit_ = nullptr;
  sqlite3_stmt* rollback_ = nullptr;
  sqlite3_stmt* page_count_ = nullptr;
  sqlite3_stmt* vacuum_ = nullptr;
  std::uint64_t dropped_by_new_limit_ = 0;  // counted in dropped_, not yet reported
  std::uint64_t compilations_ = 0;          // sql_compilations()

  // In memory only: after a restart every record is available again (at-least-once).
  std::unordered_set<std::int64_t> in_flight_;
  // Oldest first: every record with a smaller id is in flight (push and release lower it).
  std::int64_t scan_from_ = std::numeric_limits<std::int64_t>::min();
  std::uint64_t queued_records_ = 0;
  std::uint64_t queued_readings_ = 0;
  std::uint64_t stored_bytes_ = 0;
  std::uint64_t dropped_ = 0;
};

}  // namespace

std::unique_ptr<Queue> Queue::open(const std::filesystem::path& state_dir,
                                   const config::QueueConfig& limits, std::string* warning,
                                   std::string* error) {
  return open(state_dir, limits, QueueOptions{}, warning, error);
}

std::unique_ptr<Queue> Queue::open(const std::filesystem::path& state_dir,
                                   const config::QueueConfig& limits, const QueueOptions& options,
                                   std::string* warning, std::string* error) {
  if (!ensure_directory(state_dir, 0700, error)) return nullptr;
  auto q = std::make_unique<SqliteQueue>(state_dir, limits, options);
  std::string err;
  if (!q->connect(true, warning, &err)) {
    // The agent keeps running and keeps trying: every push reports the problem and reconnects,
    // so a state dir that is read-only or full now works once it is fixed (docs/queue.md).
    if (warning) {
      if (!warning->empty()) *warning += "; ";
      *warning += "the telemetry queue is unavailable for now: " + err;
    }
  }
  return q;
}

}  // namespace tb::telemetry
