#pragma once
/// @file The SQLite store of recorded parameter shifts: one embedded database file with a documented schema
/// (docs/transparency.md) that anyone can query with the sqlite3 shell. A background thread writes the steps a
/// recorder hands over through a bounded queue, many steps per transaction, so the training loop never waits on
/// the disk unless the queue is full.

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <filesystem>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include <sqlite3.h>

#include <rlhf/detail/error.hpp>

namespace rlhf {

// ---- a thin RAII layer over the SQLite C API ----

namespace detail {

/// An open SQLite connection; closes on destruction. Errors throw rlhf::Error naming the file.
class SqliteDb {
 public:
  SqliteDb() = default;
  /// Opens (and with `create`, creates) the database at `path`; `read_only` opens it for queries only.
  SqliteDb(const std::filesystem::path& path, bool create, bool read_only = false) : path_(path.string()) {
    const int flags = read_only ? SQLITE_OPEN_READONLY
                                : (SQLITE_OPEN_READWRITE | (create ? SQLITE_OPEN_CREATE : 0));
    if (sqlite3_open_v2(path_.c_str(), &db_, flags | SQLITE_OPEN_NOMUTEX, nullptr) != SQLITE_OK) {
      const std::string message = db_ ? sqlite3_errmsg(db_) : "out of memory";
      sqlite3_close(db_);
      db_ = nullptr;
      fail("shift store: {}: cannot open ({})", path_, message);
    }
    sqlite3_busy_timeout(db_, 10000);
  }
  ~SqliteDb() { sqlite3_close(db_); }
  SqliteDb(SqliteDb&& other) noexcept : db_(std::exchange(other.db_, nullptr)), path_(std::move(other.path_)) {}
  SqliteDb& operator=(SqliteDb&& other) noexcept {
    std::swap(db_, other.db_);
    std::swap(path_, other.path_);
    return *this;
  }

  /// Runs one or more statements without results.
  void exec(const std::string& sql) {
    char* error = nullptr;
    if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &error) != SQLITE_OK) {
      std::string message = error ? error : "unknown error";
      sqlite3_free(error);
      fail("shift store: {}: {} (in: {})", path_, message, sql.substr(0, 120));
    }
  }

  sqlite3* get() const { return db_; }
  const std::string& path() const { return path_; }

 private:
  sqlite3* db_ = nullptr;
  std::string path_;
};

/// A prepared statement; finalised on destruction. bind() then step() (or rows()), reset() to reuse.
class SqliteStatement {
 public:
  SqliteStatement(SqliteDb& db, const std::string& sql) : db_(&db) {
    if (sqlite3_prepare_v2(db.get(), sql.c_str(), -1, &stmt_, nullptr) != SQLITE_OK)
      fail("shift store: {}: cannot prepare '{}': {}", db.path(), sql, sqlite3_errmsg(db.get()));
  }
  ~SqliteStatement() { sqlite3_finalize(stmt_); }
  SqliteStatement(const SqliteStatement&) = delete;
  SqliteStatement& operator=(const SqliteStatement&) = delete;

  SqliteStatement& bind(int i, int64_t v) { return check(sqlite3_bind_int64(stmt_, i, v)); }
  SqliteStatement& bind(int i, double v) { return check(sqlite3_bind_double(stmt_, i, v)); }
  SqliteStatement& bind(int i, const std::string& v) {
    return check(sqlite3_bind_text(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT));
  }

  /// Advances; true while a row is available.
  bool step() {
    const int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    fail("shift store: {}: {}", db_->path(), sqlite3_errmsg(db_->get()));
  }
  /// Resets for another execution (bindings are kept until rebound).
  void reset() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }

  int64_t integer(int col) const { return sqlite3_column_int64(stmt_, col); }
  double real(int col) const { return sqlite3_column_double(stmt_, col); }
  std::string text(int col) const {
    const auto* p = sqlite3_column_text(stmt_, col);
    return p ? std::string(reinterpret_cast<const char*>(p), static_cast<size_t>(sqlite3_column_bytes(stmt_, col)))
             : std::string();
  }
  bool is_null(int col) const { return sqlite3_column_type(stmt_, col) == SQLITE_NULL; }

 private:
  SqliteStatement& check(int rc) {
    if (rc != SQLITE_OK) fail("shift store: {}: bind failed: {}", db_->path(), sqlite3_errmsg(db_->get()));
    return *this;
  }
  SqliteDb* db_;
  sqlite3_stmt* stmt_ = nullptr;
};

/// "12 7 5" for token ids {12, 7, 5}: the text form of a datum in the data table.
inline std::string join_tokens(const std::vector<int64_t>& tokens) {
  std::string out;
  out.reserve(tokens.size() * 6);
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (i) out += ' ';
    out += std::to_string(tokens[i]);
  }
  return out;
}

/// The token ids of a data-table text ("12 7 5").
inline std::vector<int64_t> split_tokens(const std::string& text) {
  std::vector<int64_t> out;
  int64_t value = 0;
  bool in_number = false, negative = false;
  for (char c : text) {
    if (c == '-') {
      negative = true;
    } else if (c >= '0' && c <= '9') {
      value = value * 10 + (c - '0');
      in_number = true;
    } else if (in_number) {
      out.push_back(negative ? -value : value);
      value = 0;
      in_number = negative = false;
    }
  }
  if (in_number) out.push_back(negative ? -value : value);
  return out;
}

}  // namespace detail

// ---- schema ----

/// The store's tables and views (documented with example queries in docs/transparency.md).
inline constexpr const char* kShiftStoreSchema = R"sql(
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS units(
  unit INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, role TEXT NOT NULL, kind TEXT NOT NULL,
  layer INTEGER NOT NULL, rows INTEGER NOT NULL, cols INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS data(datum INTEGER PRIMARY KEY, n_tokens INTEGER NOT NULL, tokens TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS batches(
  epoch INTEGER NOT NULL, step INTEGER NOT NULL, row INTEGER NOT NULL, datum INTEGER NOT NULL,
  PRIMARY KEY(epoch, step, row)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS steps(
  epoch INTEGER NOT NULL, step INTEGER NOT NULL, data INTEGER NOT NULL, kept INTEGER NOT NULL,
  threshold REAL NOT NULL, clip_coef REAL NOT NULL, lr REAL NOT NULL, update_norm REAL NOT NULL,
  data_share_norm REAL NOT NULL, residual_norm REAL NOT NULL, PRIMARY KEY(epoch, step)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS shifts(
  epoch INTEGER NOT NULL, step INTEGER NOT NULL, datum INTEGER NOT NULL, unit INTEGER NOT NULL,
  idx INTEGER NOT NULL, diff REAL NOT NULL);
CREATE TABLE IF NOT EXISTS vocab(token INTEGER PRIMARY KEY, text TEXT NOT NULL);
DROP VIEW IF EXISTS neuron_shifts;
CREATE VIEW neuron_shifts AS
  SELECT s.epoch, s.step, s.datum, s.unit, u.name AS unit_name, u.layer, u.role, u.kind, s.idx, s.diff,
         CASE WHEN u.role = 'mlp_in' AND u.kind IN ('weight', 'bias') THEN s.idx % u.cols
              WHEN u.role = 'mlp_in' AND u.kind = 'lora_B' THEN s.idx / u.cols
              WHEN u.role = 'mlp_out' AND u.kind = 'weight' THEN s.idx / u.cols
              WHEN u.role = 'mlp_out' AND u.kind = 'lora_A' THEN s.idx % u.cols END AS neuron
  FROM shifts s JOIN units u ON u.unit = s.unit
  WHERE (u.role = 'mlp_in' AND u.kind IN ('weight', 'bias', 'lora_B'))
     OR (u.role = 'mlp_out' AND u.kind IN ('weight', 'lora_A'));
)sql";

// ---- what a recorder hands over ----

/// One kept shift of a step: datum `row` of the batch moved element `idx` (row-major flat index into the tensor
/// as stored, e.g. i * out + o for a Conv1D weight [in, out]) of unit `unit` by `diff`.
struct ShiftEntry {
  int32_t row = 0;   ///< row of the batch (the datum's position in the step)
  int32_t unit = 0;  ///< unit id (ShiftStore::add_unit)
  int64_t idx = 0;   ///< flat index into the unit's tensor
  double diff = 0;   ///< the datum's share of the applied update of that element
};

/// Everything recorded for one step.
struct StepShifts {
  int64_t epoch = 0;
  int64_t step = 0;
  std::vector<std::vector<int64_t>> data;  ///< token ids of each batch row (real tokens only)
  std::vector<ShiftEntry> entries;         ///< the kept shifts, largest |diff| first
  double threshold = 0;                    ///< smallest kept |diff|
  double clip_coef = 1;                    ///< gradient-clipping factor of the step
  double lr = 0;                           ///< learning rate of the step (the first recorded unit's group)
  double update_norm = 0;                  ///< norm of the applied update over the recorded units
  double data_share_norm = 0;              ///< norm of the sum of the data's shares
  double residual_norm = 0;                ///< norm of the momentum + weight-decay shares
};

/// Counters of a store.
struct ShiftStoreStats {
  int64_t steps = 0;              ///< steps committed
  int64_t rows = 0;               ///< shift rows committed
  int64_t transactions = 0;       ///< transactions committed
  double write_seconds = 0;       ///< time the writer thread spent in SQLite
  int64_t bytes = 0;              ///< database + WAL bytes on disk (after flush())
  double rows_per_second() const { return write_seconds > 0 ? static_cast<double>(rows) / write_seconds : 0.0; }
  double bytes_per_step() const { return steps > 0 ? static_cast<double>(bytes) / static_cast<double>(steps) : 0.0; }
};

/// Options of a ShiftStore.
struct ShiftStoreOptions {
  int64_t queue_steps = 16;    ///< steps that may wait for the writer before push() blocks, e.g. 16
  int64_t max_batch_steps = 64;  ///< steps written in one transaction at most, e.g. 64
};

// ---- the store ----

/// Writes recorded shifts into an SQLite database at `path` (created with the schema when missing, appended to
/// when present). push() hands a step to the writer thread and returns at once unless `queue_steps` steps are
/// already waiting; flush() waits until everything pushed is committed. Errors of the writer thread are rethrown
/// by the next push() or flush(). The destructor flushes (swallowing errors) and stops the thread.
class ShiftStore {
 public:
  explicit ShiftStore(const std::filesystem::path& path, ShiftStoreOptions options = {})
      : path_(path), options_(options), db_(path, /*create=*/true) {
    if (options_.queue_steps < 1 || options_.max_batch_steps < 1)
      detail::fail("ShiftStoreOptions: queue_steps ({}) and max_batch_steps ({}) must be >= 1", options_.queue_steps,
                   options_.max_batch_steps);
    db_.exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;");
    db_.exec(kShiftStoreSchema);
    load_data_ids();
    writer_ = std::thread([this] { run(); });
  }
  ~ShiftStore() {
    try {
      flush();
    } catch (...) {
    }
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    wake_writer_.notify_all();
    writer_.join();
  }
  ShiftStore(const ShiftStore&) = delete;
  ShiftStore& operator=(const ShiftStore&) = delete;

  /// Registers a unit (a recorded tensor) and returns its id; a name already present returns its id. `role` is
  /// e.g. "mlp_in", `kind` "weight" or "bias", `rows` x `cols` the stored shape (rows = 1 for a vector).
  int32_t add_unit(const std::string& name, const std::string& role, const std::string& kind, int64_t layer,
                   int64_t rows, int64_t cols) {
    flush();
    std::lock_guard db_lock(db_mutex_);
    {
      detail::SqliteStatement insert(db_, "INSERT OR IGNORE INTO units(name, role, kind, layer, rows, cols) "
                                          "VALUES(?, ?, ?, ?, ?, ?)");
      insert.bind(1, name).bind(2, role).bind(3, kind).bind(4, layer).bind(5, rows).bind(6, cols);
      insert.step();
    }
    detail::SqliteStatement select(db_, "SELECT unit, rows, cols FROM units WHERE name = ?");
    select.bind(1, name);
    select.step();
    if (select.integer(1) != rows || select.integer(2) != cols)
      detail::fail("shift store: {}: unit '{}' is stored as [{}, {}], the recorder has [{}, {}] ---> HINT: a store "
                   "holds one model's shifts; use a new file for another architecture",
                   path_.string(), name, select.integer(1), select.integer(2), rows, cols);
    return static_cast<int32_t>(select.integer(0));
  }

  /// Writes `text` under `key` in the meta table (replacing an earlier value).
  void set_meta(const std::string& key, const std::string& text) {
    flush();
    std::lock_guard db_lock(db_mutex_);
    detail::SqliteStatement s(db_, "INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)");
    s.bind(1, key).bind(2, text);
    s.step();
  }

  /// Fills the vocab table (token id -> text) so that queries can show words; `texts[i]` is token i.
  void write_vocab(const std::vector<std::string>& texts) {
    flush();
    std::lock_guard db_lock(db_mutex_);
    db_.exec("BEGIN");
    detail::SqliteStatement s(db_, "INSERT OR REPLACE INTO vocab(token, text) VALUES(?, ?)");
    for (size_t i = 0; i < texts.size(); ++i) {
      s.bind(1, static_cast<int64_t>(i)).bind(2, texts[i]);
      s.step();
      s.reset();
    }
    db_.exec("COMMIT");
  }

  /// Queues one step for the writer; blocks while `queue_steps` steps are waiting.
  void push(StepShifts step) {
    std::unique_lock lock(mutex_);
    rethrow_locked();
    queue_space_.wait(lock, [&] { return static_cast<int64_t>(queue_.size()) < options_.queue_steps || error_; });
    rethrow_locked();
    queue_.push_back(std::move(step));
    ++pushed_;
    lock.unlock();
    wake_writer_.notify_one();
  }

  /// Waits until every pushed step is committed; rethrows a writer error.
  void flush() {
    std::unique_lock lock(mutex_);
    drained_.wait(lock, [&] { return committed_ == pushed_ || error_; });
    rethrow_locked();
  }

  /// Creates the indexes the analysis queries use (shifts by unit and index, by datum). Call once after training:
  /// indexes would slow every insert during it.
  void create_indexes() {
    flush();
    std::lock_guard db_lock(db_mutex_);
    db_.exec("CREATE INDEX IF NOT EXISTS shifts_by_unit ON shifts(unit, idx);"
             "CREATE INDEX IF NOT EXISTS shifts_by_datum ON shifts(datum);");
  }

  /// Flushes, then moves the write-ahead log into the database file and truncates it, so that the file holds
  /// everything and stats().bytes measures the data rather than the log's preallocated pages.
  void checkpoint() {
    flush();
    std::lock_guard db_lock(db_mutex_);
    db_.exec("PRAGMA wal_checkpoint(TRUNCATE);");
  }

  /// Counters so far (bytes: the database and its write-ahead log on disk now; checkpoint() first for a settled
  /// number).
  ShiftStoreStats stats() const {
    ShiftStoreStats out;
    {
      std::lock_guard lock(mutex_);
      out = stats_;
    }
    std::error_code ec;
    for (const auto* suffix : {"", "-wal"}) {
      const auto size = std::filesystem::file_size(path_.string() + suffix, ec);
      if (!ec) out.bytes += static_cast<int64_t>(size);
    }
    return out;
  }

  const std::filesystem::path& path() const { return path_; }

 private:
  void rethrow_locked() {
    if (error_) std::rethrow_exception(error_);
  }

  void load_data_ids() {
    detail::SqliteStatement s(db_, "SELECT datum, tokens FROM data");
    while (s.step()) data_ids_.emplace(s.text(1), s.integer(0));
  }

  void run() {
    for (;;) {
      std::vector<StepShifts> batch;
      {
        std::unique_lock lock(mutex_);
        wake_writer_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty() && stop_) return;
        while (!queue_.empty() && static_cast<int64_t>(batch.size()) < options_.max_batch_steps) {
          batch.push_back(std::move(queue_.front()));
          queue_.pop_front();
        }
      }
      queue_space_.notify_all();
      const auto start = std::chrono::steady_clock::now();
      int64_t rows = 0;
      try {
        std::lock_guard db_lock(db_mutex_);
        rows = write(batch);
      } catch (...) {
        std::lock_guard lock(mutex_);
        error_ = std::current_exception();
        committed_ += static_cast<int64_t>(batch.size());
        drained_.notify_all();
        queue_space_.notify_all();
        continue;
      }
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      {
        std::lock_guard lock(mutex_);
        committed_ += static_cast<int64_t>(batch.size());
        stats_.steps += static_cast<int64_t>(batch.size());
        stats_.rows += rows;
        stats_.transactions += 1;
        stats_.write_seconds += seconds;
      }
      drained_.notify_all();
    }
  }

  /// Writes `batch` in one transaction; returns the shift rows written.
  int64_t write(const std::vector<StepShifts>& batch) {
    db_.exec("BEGIN");
    try {
      detail::SqliteStatement insert_datum(db_, "INSERT INTO data(datum, n_tokens, tokens) VALUES(?, ?, ?)");
      detail::SqliteStatement insert_row(db_, "INSERT OR REPLACE INTO batches(epoch, step, row, datum) "
                                              "VALUES(?, ?, ?, ?)");
      detail::SqliteStatement insert_step(
          db_, "INSERT OR REPLACE INTO steps(epoch, step, data, kept, threshold, clip_coef, lr, update_norm, "
               "data_share_norm, residual_norm) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
      detail::SqliteStatement insert_shift(db_, "INSERT INTO shifts(epoch, step, datum, unit, idx, diff) "
                                                "VALUES(?, ?, ?, ?, ?, ?)");
      int64_t rows = 0;
      for (const auto& s : batch) {
        std::vector<int64_t> ids;
        ids.reserve(s.data.size());
        for (size_t r = 0; r < s.data.size(); ++r) {
          auto text = detail::join_tokens(s.data[r]);
          auto [it, fresh] = data_ids_.emplace(std::move(text), static_cast<int64_t>(data_ids_.size()));
          if (fresh) {
            insert_datum.bind(1, it->second).bind(2, static_cast<int64_t>(s.data[r].size())).bind(3, it->first);
            insert_datum.step();
            insert_datum.reset();
          }
          ids.push_back(it->second);
          insert_row.bind(1, s.epoch).bind(2, s.step).bind(3, static_cast<int64_t>(r)).bind(4, it->second);
          insert_row.step();
          insert_row.reset();
        }
        insert_step.bind(1, s.epoch).bind(2, s.step).bind(3, static_cast<int64_t>(s.data.size()))
            .bind(4, static_cast<int64_t>(s.entries.size())).bind(5, s.threshold).bind(6, s.clip_coef)
            .bind(7, s.lr).bind(8, s.update_norm).bind(9, s.data_share_norm).bind(10, s.residual_norm);
        insert_step.step();
        insert_step.reset();
        for (const auto& e : s.entries) {
          if (e.row < 0 || static_cast<size_t>(e.row) >= ids.size())
            detail::fail("shift store: step {} has a shift of row {} but {} data", s.step, e.row, ids.size());
          insert_shift.bind(1, s.epoch).bind(2, s.step).bind(3, ids[e.row]).bind(4, static_cast<int64_t>(e.unit))
              .bind(5, e.idx).bind(6, e.diff);
          insert_shift.step();
          insert_shift.reset();
          ++rows;
        }
      }
      db_.exec("COMMIT");
      return rows;
    } catch (...) {
      char* ignored = nullptr;
      sqlite3_exec(db_.get(), "ROLLBACK", nullptr, nullptr, &ignored);
      sqlite3_free(ignored);
      throw;
    }
  }

  std::filesystem::path path_;
  ShiftStoreOptions options_;
  detail::SqliteDb db_;
  std::mutex db_mutex_;  // the connection: writer thread vs. add_unit / set_meta / write_vocab
  std::unordered_map<std::string, int64_t> data_ids_;  // data text -> datum id (writer thread only)

  mutable std::mutex mutex_;  // queue, counters, error
  std::condition_variable wake_writer_, queue_space_, drained_;
  std::deque<StepShifts> queue_;
  int64_t pushed_ = 0, committed_ = 0;
  ShiftStoreStats stats_;
  std::exception_ptr error_;
  bool stop_ = false;
  std::thread writer_;
};

}  // namespace rlhf
