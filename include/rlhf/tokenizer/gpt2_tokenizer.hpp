#pragma once
/// @file GPT-2's byte-level BPE tokenizer (Radford et al. 2019, "Language Models are Unsupervised Multitask
/// Learners"; BPE: Sennrich et al. 2016, arXiv 1508.07909), loading the vocab.json + merges.txt files of OpenAI's
/// release or a Hugging Face tokenizer.json. Encoding gives the same ids as OpenAI's encoder.py and Hugging Face's
/// GPT2Tokenizer on valid UTF-8, and round-trips arbitrary bytes (see docs/tokenizer.md). Needs PCRE2 (libpcre2-8)
/// and nlohmann-json; no LibTorch (batch encoding into tensors is in rlhf/tokenizer/batch_encode.hpp).

#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <rlhf/detail/error.hpp>
#include <rlhf/io/atomic_file.hpp>

namespace rlhf {
namespace detail::gpt2 {

// ---- byte <-> unicode mapping ----

/// Token ids are stored in 32 bits internally; a vocab may use ids in [0, kMaxTokenId).
inline constexpr int64_t kMaxTokenId = int64_t{1} << 24;
/// Pieces up to this many bytes have their BPE result cached.
inline constexpr std::size_t kMaxCachedPieceBytes = 256;
/// Words of at most this many bytes go through the quadratic reference BPE loop, longer ones through the
/// priority-queue version (same result, O(n log n)).
inline constexpr std::size_t kNaiveBpeMaxSymbols = 48;
/// GPT-2's special token, used as end of text (and as beginning of text and padding by many models).
inline constexpr std::string_view kEndOfText = "<|endoftext|>";

/// GPT-2's byte order: the 188 printable bytes 33..126, 161..172, 174..255, then the others 0..32, 127..160, 173.
/// GPT-2's vocab.json gives id i to the token of byte_order()[i], and so does GPT2Tokenizer::byte_level().
inline const std::array<uint8_t, 256>& byte_order() {
  static const std::array<uint8_t, 256> order = [] {
    std::array<uint8_t, 256> result{};
    std::array<bool, 256> printable{};
    std::size_t n = 0;
    for (int b = 0; b < 256; ++b) {
      printable[b] = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      if (printable[b]) result[n++] = static_cast<uint8_t>(b);
    }
    for (int b = 0; b < 256; ++b) {
      if (!printable[b]) result[n++] = static_cast<uint8_t>(b);
    }
    return result;
  }();
  return order;
}

/// GPT-2's bytes_to_unicode(): printable bytes stand for themselves, the n-th other byte (in byte order) for the
/// code point 256 + n, so that every byte is a visible character (the space 0x20 becomes 'Ġ' U+0120).
inline const std::array<char32_t, 256>& byte_to_code_point() {
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> result{};
    char32_t next = 256;
    for (uint8_t b : byte_order()) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
      result[b] = printable ? char32_t{b} : next++;
    }
    return result;
  }();
  return table;
}

/// Appends the UTF-8 encoding of a code point.
inline void append_utf8(char32_t c, std::string& out) {
  if (c < 0x80) {
    out.push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (c >> 6)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (c >> 12)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (c >> 18)));
    out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

/// The byte-level token string of each byte, e.g. byte_tokens()[0x20] == "Ġ".
inline const std::array<std::string, 256>& byte_tokens() {
  static const std::array<std::string, 256> tokens = [] {
    std::array<std::string, 256> result;
    for (int b = 0; b < 256; ++b) append_utf8(byte_to_code_point()[b], result[b]);
    return result;
  }();
  return tokens;
}

/// Bytes -> their byte-level token form, e.g. " the" -> "Ġthe".
inline std::string bytes_to_token(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char c : bytes) out += byte_tokens()[static_cast<uint8_t>(c)];
  return out;
}

/// The inverse of byte_to_code_point(): code point -> byte, -1 for code points that stand for no byte.
inline const std::array<int16_t, 512>& code_point_to_byte() {
  static const std::array<int16_t, 512> table = [] {
    std::array<int16_t, 512> result;
    result.fill(-1);
    for (int b = 0; b < 256; ++b) result[byte_to_code_point()[b]] = static_cast<int16_t>(b);
    return result;
  }();
  return table;
}

/// Byte-level token form -> bytes ("Ġthe" -> " the"); nullopt when the string has a character that stands for no
/// byte (a special token such as "<|endoftext|>" is all printable ASCII and so maps to itself).
inline std::optional<std::string> token_to_bytes(std::string_view token) {
  std::string out;
  out.reserve(token.size());
  std::size_t i = 0;
  while (i < token.size()) {
    const auto lead = static_cast<uint8_t>(token[i]);
    char32_t c = 0;
    std::size_t len = 0;
    if (lead < 0x80) {
      c = lead;
      len = 1;
    } else if ((lead & 0xE0) == 0xC0) {
      c = lead & 0x1F;
      len = 2;
    } else {
      return std::nullopt;  // every byte's character is below U+0800
    }
    if (i + len > token.size()) return std::nullopt;
    for (std::size_t k = 1; k < len; ++k) {
      const auto cont = static_cast<uint8_t>(token[i + k]);
      if ((cont & 0xC0) != 0x80) return std::nullopt;
      c = (c << 6) | (cont & 0x3F);
    }
    i += len;
    const std::array<int16_t, 512>& reverse = code_point_to_byte();
    if (c >= reverse.size() || reverse[c] < 0 || (len == 2 && c < 0x80)) return std::nullopt;
    out.push_back(static_cast<char>(reverse[c]));
  }
  return out;
}

// ---- pre-tokenisation ----

/// Unicode White_Space (what Python's `regex` and Rust's `regex` use for \s), as a PCRE2 class body. PCRE2's own
/// \s and \h differ from it (\h has U+180E, which Unicode no longer counts as white space).
inline constexpr std::string_view kWhiteSpaceClass =
    "\\x{9}-\\x{D}\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}";

/// GPT-2's pre-tokenisation pattern
///   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
/// with \s spelled out as Unicode White_Space.
inline std::string gpt2_pattern() {
  const std::string ws(kWhiteSpaceClass);
  return "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" + ws + "\\p{L}\\p{N}]+|[" + ws + "]+(?![^" + ws +
         "])|[" + ws + "]+";
}

/// GPT-2's regex pre-tokeniser on PCRE2 (UTF + UCP, JIT when available). Bytes that are not valid UTF-8 match
/// nothing; each maximal run of them becomes a piece of its own, so every byte of the input is in some piece.
/// Thread-safe: the compiled pattern is shared and immutable, match data is per call.
class PreTokenizer {
 public:
  /// Compiles the pattern; throws rlhf::Error if PCRE2 refuses it.
  PreTokenizer() {
    const std::string pattern = gpt2_pattern();
    int error_code = 0;
    PCRE2_SIZE error_offset = 0;
    pcre2_code_8* code = pcre2_compile_8(reinterpret_cast<PCRE2_SPTR8>(pattern.data()), pattern.size(),
                                         PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error_code,
                                         &error_offset, nullptr);
    if (code == nullptr) {
      fail("tokenizer: cannot compile the GPT-2 pattern at offset {}: {}", error_offset, error_message(error_code));
    }
    code_ = std::shared_ptr<pcre2_code_8>(code, [](pcre2_code_8* c) { pcre2_code_free_8(c); });
    jit_ = pcre2_jit_compile_8(code, PCRE2_JIT_COMPLETE) == 0;
  }

  /// True when PCRE2's JIT compiled the pattern (it falls back to the interpreter otherwise).
  bool jit() const { return jit_; }

  /// Calls on_piece(std::string_view) for each pre-token of text, in order; the pieces concatenate to text.
  template <class OnPiece>
  void split(std::string_view text, OnPiece&& on_piece) const {
    std::unique_ptr<pcre2_match_data_8, void (*)(pcre2_match_data_8*)> match(
        pcre2_match_data_create_8(1, nullptr), [](pcre2_match_data_8* m) { pcre2_match_data_free_8(m); });
    if (!match) fail("tokenizer: out of memory allocating PCRE2 match data");
    const auto* subject = reinterpret_cast<PCRE2_SPTR8>(text.data());
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer_8(match.get());
    std::size_t pos = 0;
    while (pos < text.size()) {
      const int rc = jit_ ? pcre2_jit_match_8(code_.get(), subject, text.size(), pos, 0, match.get(), nullptr)
                          : pcre2_match_8(code_.get(), subject, text.size(), pos, 0, match.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) {
        on_piece(text.substr(pos));  // only invalid UTF-8 is left
        return;
      }
      if (rc < 0) fail("tokenizer: PCRE2 match failed at byte {}: {}", pos, error_message(rc));
      const std::size_t start = ovector[0];
      const std::size_t end = ovector[1];
      if (start > pos) on_piece(text.substr(pos, start - pos));  // a run of invalid UTF-8 bytes
      if (end <= start) fail("tokenizer: the GPT-2 pattern matched an empty string at byte {}", start);
      on_piece(text.substr(start, end - start));
      pos = end;
    }
  }

 private:
  static std::string error_message(int code) {
    std::array<PCRE2_UCHAR8, 256> buffer{};
    const int n = pcre2_get_error_message_8(code, buffer.data(), buffer.size());
    return n < 0 ? fmt::format("PCRE2 error {}", code) : std::string(reinterpret_cast<const char*>(buffer.data()));
  }

  std::shared_ptr<pcre2_code_8> code_;
  bool jit_ = false;
};

// ---- BPE ----

/// Merge rules keyed by the pair of token ids: (left, right) -> merged id and rank (lower merges first). An
/// open-addressing hash table, as the lookup is the inner loop of BPE.
class MergeTable {
 public:
  /// One merge rule.
  struct Rule {
    /// Id of the merged token (left + right).
    int32_t merged = -1;
    /// Position in merges.txt: 0 is merged first.
    int32_t rank = -1;
  };

  /// Sizes the table for n rules.
  void reserve(std::size_t n) {
    std::size_t capacity = 16;
    while (capacity < 2 * n + 2) capacity *= 2;
    rehash(capacity);
  }

  /// Adds a rule; a pair already present takes the new rank (as a Python dict built from merges.txt does).
  void insert(int32_t left, int32_t right, Rule rule) {
    if (2 * (size_ + 1) > slots_.size()) rehash(std::max<std::size_t>(16, 2 * slots_.size()));
    const uint64_t key = pack(left, right);
    std::size_t i = slot_of(key);
    while (slots_[i].key != kEmpty && slots_[i].key != key) i = (i + 1) & mask_;
    if (slots_[i].key == kEmpty) ++size_;
    slots_[i] = Slot{key, rule};
  }

  /// The rule merging left and right, or nullptr.
  const Rule* find(int32_t left, int32_t right) const {
    if (slots_.empty()) return nullptr;
    const uint64_t key = pack(left, right);
    for (std::size_t i = slot_of(key);; i = (i + 1) & mask_) {
      if (slots_[i].key == key) return &slots_[i].rule;
      if (slots_[i].key == kEmpty) return nullptr;
    }
  }

  /// Number of rules.
  std::size_t size() const { return size_; }

 private:
  struct Slot {
    uint64_t key = kEmpty;
    Rule rule;
  };
  static constexpr uint64_t kEmpty = ~uint64_t{0};

  static uint64_t pack(int32_t left, int32_t right) {
    return (uint64_t{static_cast<uint32_t>(left)} << 32) | static_cast<uint32_t>(right);
  }
  std::size_t slot_of(uint64_t key) const {
    return static_cast<std::size_t>((key * 0x9E3779B97F4A7C15ull) >> 32) & mask_;
  }
  void rehash(std::size_t capacity) {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(capacity, Slot{});
    mask_ = capacity - 1;
    size_ = 0;
    for (const Slot& s : old) {
      if (s.key != kEmpty) insert(static_cast<int32_t>(s.key >> 32), static_cast<int32_t>(s.key & 0xFFFFFFFFu),
                                  s.rule);
    }
  }

  std::vector<Slot> slots_;
  std::size_t mask_ = 0;
  std::size_t size_ = 0;
};

/// BPE exactly as OpenAI's encoder.py bpe(): while some adjacent pair has a rule, take the pair of lowest rank and
/// merge all its occurrences in one left-to-right pass. The rank of each adjacent pair is kept and looked up again
/// only next to merged symbols; O(n^2) scans in the word length, fast for short words.
inline void bpe_reference(std::vector<int32_t>& word, const MergeTable& merges) {
  constexpr int32_t kNone = std::numeric_limits<int32_t>::max();
  constexpr std::size_t kStack = 64;
  const std::size_t n = word.size();
  if (n < 2) return;
  std::array<int32_t, kStack> stack_ranks;
  std::array<uint8_t, kStack> stack_changed;
  std::vector<int32_t> heap_ranks;
  std::vector<uint8_t> heap_changed;
  int32_t* rank = stack_ranks.data();  // rank[i]: rank of (word[i], word[i + 1]), kNone if no rule
  uint8_t* changed = stack_changed.data();  // changed[i], i >= best: word[i] was made by the last pass
  if (n > kStack) {
    heap_ranks.resize(n);
    heap_changed.resize(n);
    rank = heap_ranks.data();
    changed = heap_changed.data();
  }
  const auto rank_of = [&](int32_t left, int32_t right) {
    const MergeTable::Rule* rule = merges.find(left, right);
    return rule != nullptr ? rule->rank : kNone;
  };
  std::size_t size = n;
  for (std::size_t i = 0; i + 1 < size; ++i) rank[i] = rank_of(word[i], word[i + 1]);
  while (size > 1) {
    std::size_t best = 0;
    for (std::size_t i = 1; i + 1 < size; ++i) {
      if (rank[i] < rank[best]) best = i;
    }
    if (rank[best] == kNone) break;
    const int32_t left = word[best];
    const int32_t right = word[best + 1];
    const int32_t merged = merges.find(left, right)->merged;
    std::size_t out = best;
    for (std::size_t i = best; i < size;) {
      if (i + 1 < size && word[i] == left && word[i + 1] == right) {
        word[out] = merged;
        changed[out++] = 1;
        i += 2;
      } else {
        word[out] = word[i];
        rank[out] = rank[i];  // still right unless the next symbol changes
        changed[out++] = 0;
        i += 1;
      }
    }
    size = out;
    for (std::size_t i = (best > 0 ? best - 1 : 0); i + 1 < size; ++i) {  // symbols before best are unchanged
      if ((i >= best && changed[i]) || changed[i + 1]) rank[i] = rank_of(word[i], word[i + 1]);
    }
  }
  word.resize(size);
}

/// The same result as bpe_reference() in O(n log n): a min-heap of (rank, position) over a linked list of symbols.
/// All occurrences of the lowest-ranked pair are merged left to right before any pair they create is considered.
inline void bpe_heap(std::vector<int32_t>& word, const MergeTable& merges) {
  const auto n = static_cast<int32_t>(word.size());
  if (n < 2) return;
  std::vector<int32_t> prev(n), next(n);
  for (int32_t i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  using Entry = std::pair<int32_t, int32_t>;  // (rank, position of the left symbol)
  std::vector<Entry> heap;
  const auto push = [&](int32_t left_pos) {
    const int32_t right_pos = next[left_pos];
    if (right_pos < 0) return;
    if (const MergeTable::Rule* rule = merges.find(word[left_pos], word[right_pos])) {
      heap.emplace_back(rule->rank, left_pos);
      std::push_heap(heap.begin(), heap.end(), std::greater<>{});
    }
  };
  for (int32_t i = 0; i + 1 < n; ++i) push(i);
  std::vector<int32_t> batch;
  while (!heap.empty()) {
    const int32_t rank = heap.front().first;
    batch.clear();
    while (!heap.empty() && heap.front().first == rank) {  // pops in increasing position
      batch.push_back(heap.front().second);
      std::pop_heap(heap.begin(), heap.end(), std::greater<>{});
      heap.pop_back();
    }
    for (int32_t pos : batch) {
      const int32_t right_pos = next[pos];
      if (word[pos] < 0 || right_pos < 0) continue;  // merged away, or now last
      const MergeTable::Rule* rule = merges.find(word[pos], word[right_pos]);
      if (rule == nullptr || rule->rank != rank) continue;  // stale: the pair at pos has changed
      word[pos] = rule->merged;
      word[right_pos] = -1;
      next[pos] = next[right_pos];
      if (next[pos] >= 0) prev[next[pos]] = pos;
      if (prev[pos] >= 0) push(prev[pos]);
      push(pos);
    }
  }
  int32_t out = 0;
  for (int32_t i = 0; i >= 0; i = next[i]) word[out++] = word[i];
  word.resize(out);
}

/// BPE of one word given as its byte token ids; picks the reference loop or the heap by length.
inline void bpe(std::vector<int32_t>& word, const MergeTable& merges) {
  if (word.size() <= kNaiveBpeMaxSymbols) {
    bpe_reference(word, merges);
  } else {
    bpe_heap(word, merges);
  }
}

/// std::hash over strings that also finds by std::string_view (heterogeneous lookup).
struct StringHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};

/// Piece bytes -> BPE ids: a flat open-addressing table over two arenas (piece bytes, ids), emptied when it holds
/// kMaxEntries pieces, which bounds it to a few MB. Not synchronised itself: callers hold `mutex`.
class BpeCache {
 public:
  /// Slots of the table (a power of two), allocated on the first insert.
  static constexpr std::size_t kSlots = std::size_t{1} << 16;
  /// Pieces held before the table is emptied.
  static constexpr std::size_t kMaxEntries = kSlots / 2;

  /// Guards every call.
  std::mutex mutex;

  /// Appends the cached ids of piece (whose hash is `hash`) to out and returns true, or returns false.
  bool find(std::string_view piece, uint64_t hash, std::vector<int64_t>& out) const {
    if (slots_.empty()) return false;
    for (std::size_t i = hash & (kSlots - 1);; i = (i + 1) & (kSlots - 1)) {
      const Slot& slot = slots_[i];
      if (slot.key_size == 0) return false;
      if (slot.hash == hash && slot.key_size == piece.size() &&
          std::memcmp(keys_.data() + slot.key, piece.data(), piece.size()) == 0) {
        out.insert(out.end(), ids_.begin() + slot.ids, ids_.begin() + slot.ids + slot.ids_size);
        return true;
      }
    }
  }

  /// Caches the ids of a piece of 1 to kMaxCachedPieceBytes bytes.
  void insert(std::string_view piece, uint64_t hash, std::span<const int32_t> ids) {
    if (slots_.empty()) slots_.assign(kSlots, Slot{});
    if (size_ >= kMaxEntries) clear();
    std::size_t i = hash & (kSlots - 1);
    for (; slots_[i].key_size != 0; i = (i + 1) & (kSlots - 1)) {
      const Slot& slot = slots_[i];
      if (slot.hash == hash && slot.key_size == piece.size() &&
          std::memcmp(keys_.data() + slot.key, piece.data(), piece.size()) == 0) {
        return;  // another thread cached it first
      }
    }
    slots_[i] = Slot{hash, static_cast<uint32_t>(keys_.size()), static_cast<uint32_t>(ids_.size()),
                     static_cast<uint16_t>(piece.size()), static_cast<uint16_t>(ids.size())};
    keys_.append(piece);
    ids_.insert(ids_.end(), ids.begin(), ids.end());
    ++size_;
  }

  /// Forgets every piece.
  void clear() {
    std::fill(slots_.begin(), slots_.end(), Slot{});
    keys_.clear();
    ids_.clear();
    size_ = 0;
  }

  /// Number of cached pieces.
  std::size_t size() const { return size_; }

 private:
  struct Slot {
    uint64_t hash = 0;
    uint32_t key = 0;       // offset in keys_
    uint32_t ids = 0;       // offset in ids_
    uint16_t key_size = 0;  // 0 = empty slot
    uint16_t ids_size = 0;
  };
  std::vector<Slot> slots_;
  std::string keys_;
  std::vector<int32_t> ids_;
  std::size_t size_ = 0;
};

/// Where a tokenizer's data came from, for error messages: "/x/vocab.json", "merges[3]", "/x/merges.txt: line 4".
struct Source {
  /// Names the vocab: its file, or "vocab" for one given in code.
  std::string vocab = "vocab";
  /// Names merge i: "merges[i]" for merges given in code.
  std::function<std::string(std::size_t)> merge = [](std::size_t i) { return fmt::format("merges[{}]", i); };
};

// ---- files ----

/// The whole content of a file; rlhf::Error naming it when it is missing or unreadable.
inline std::string read_file(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    if (std::filesystem::exists(path, ec)) fail("tokenizer: {}: not a regular file", path.string());
    fail("tokenizer: {}: no such file", path.string());
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("tokenizer: {}: cannot open: {}", path.string(), errno_text(errno));
  std::ostringstream content;
  content << in.rdbuf();
  if (in.bad()) fail("tokenizer: {}: read error", path.string());
  return std::move(content).str();
}

/// Parses a JSON file with nlohmann-json; a syntax error becomes an rlhf::Error with nlohmann's message.
inline nlohmann::json read_json(const std::filesystem::path& path) {
  const std::string text = read_file(path);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    fail("tokenizer: {}: invalid JSON: {}", path.string(), e.what());
  }
}

/// A JSON object token -> id as a vocab map; `where` names it in errors ("/x/vocab.json").
inline std::unordered_map<std::string, int64_t> vocab_from_json(const nlohmann::json& json, const std::string& where) {
  if (!json.is_object()) fail("tokenizer: {}: expected a JSON object of token -> id, got {}", where, json.type_name());
  std::unordered_map<std::string, int64_t> vocab;
  vocab.reserve(json.size());
  for (const auto& [token, id] : json.items()) {
    if (!id.is_number_integer()) {
      fail("tokenizer: {}: token '{}' has id {}, expected an integer", where, token, id.dump());
    }
    const bool in_range = id.is_number_unsigned() ? id.get<uint64_t>() < uint64_t{kMaxTokenId}
                                                  : id.get<int64_t>() >= 0 && id.get<int64_t>() < kMaxTokenId;
    if (!in_range) fail("tokenizer: {}: token '{}' has id {}, expected 0 <= id < {}", where, token, id.dump(), kMaxTokenId);
    vocab.emplace(token, id.get<int64_t>());
  }
  return vocab;
}

/// Splits "a b" into its two tokens; nullopt unless it is exactly two non-empty tokens and one space.
inline std::optional<std::pair<std::string, std::string>> split_merge(std::string_view line) {
  const std::size_t space = line.find(' ');
  if (space == std::string_view::npos || space == 0 || space + 1 == line.size() ||
      line.find(' ', space + 1) != std::string_view::npos) {
    return std::nullopt;
  }
  return std::pair<std::string, std::string>(line.substr(0, space), line.substr(space + 1));
}

/// The special tokens named in a Hugging Face special_tokens_map.json: additional_special_tokens, then the
/// bos/eos/unk/pad/sep/cls/mask tokens, each a string or an object with "content"; duplicates dropped.
inline std::vector<std::string> special_tokens_from_map(const std::filesystem::path& path) {
  const nlohmann::json json = read_json(path);
  if (!json.is_object()) fail("tokenizer: {}: expected a JSON object, got {}", path.string(), json.type_name());
  std::vector<std::string> tokens;
  const auto add = [&](const nlohmann::json& value, const std::string& key) {
    if (value.is_string()) {
      tokens.push_back(value.get<std::string>());
    } else if (value.is_object() && value.contains("content") && value["content"].is_string()) {
      tokens.push_back(value["content"].get<std::string>());
    } else if (!value.is_null()) {
      fail("tokenizer: {}: {}: expected a string or an object with a string 'content', got {}", path.string(), key,
           value.dump());
    }
  };
  if (json.contains("additional_special_tokens")) {
    const nlohmann::json& extra = json["additional_special_tokens"];
    if (!extra.is_array()) {
      fail("tokenizer: {}: additional_special_tokens: expected an array, got {}", path.string(), extra.type_name());
    }
    for (std::size_t i = 0; i < extra.size(); ++i) add(extra[i], fmt::format("additional_special_tokens[{}]", i));
  }
  for (const char* key : {"bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"}) {
    if (json.contains(key)) add(json[key], key);
  }
  std::vector<std::string> unique;
  for (std::string& token : tokens) {
    if (std::find(unique.begin(), unique.end(), token) == unique.end()) unique.push_back(std::move(token));
  }
  return unique;
}

}  // namespace detail::gpt2

// ---- the tokenizer ----

/// GPT-2's byte-level BPE tokenizer.
///
/// Encoding: the text is split into pre-tokens by GPT-2's regex (with Unicode White_Space for \s; invalid UTF-8
/// bytes form pre-tokens of their own), each pre-token's bytes are mapped to byte tokens and merged by BPE, lowest
/// merge rank first. Special tokens ("<|endoftext|>" by default) become single ids only when encode() is asked to
/// allow them. decode() returns the exact bytes, so decode(encode(s)) == s for every byte string s.
///
/// Immutable after construction apart from an internal, mutex-guarded cache of BPE results: one tokenizer may be
/// used from many threads. Copies share the cache. See docs/tokenizer.md.
class GPT2Tokenizer {
 public:
  /// A token (in byte-level form, e.g. "Ġthe") and its id.
  using Vocab = std::unordered_map<std::string, int64_t>;
  /// Merge rules in rank order: {"Ġ", "t"} merges "Ġ" and "t" into "Ġt".
  using Merges = std::vector<std::pair<std::string, std::string>>;

  /// Builds a tokenizer from a vocab (token -> id, ids in [0, 2^24), all distinct), merges in rank order (both
  /// parts and their concatenation must be in the vocab) and special tokens; a special token missing from the vocab
  /// gets the next free id (vocab_size() at that point). Throws rlhf::Error on inconsistent data.
  GPT2Tokenizer(Vocab vocab, Merges merges, std::vector<std::string> special_tokens = {"<|endoftext|>"})
      : GPT2Tokenizer(std::move(vocab), std::move(merges), std::move(special_tokens), detail::gpt2::Source{}) {}

  /// Loads OpenAI / Hugging Face GPT-2 files: vocab.json (a JSON object token -> id) and merges.txt (an optional
  /// "#version" first line, then "a b" per line, blank lines ignored). Special tokens: "<|endoftext|>".
  static GPT2Tokenizer from_files(const std::filesystem::path& vocab_json, const std::filesystem::path& merges_txt,
                                  std::vector<std::string> special_tokens = {"<|endoftext|>"}) {
    Vocab vocab = detail::gpt2::vocab_from_json(detail::gpt2::read_json(vocab_json), vocab_json.string());
    const std::string text = detail::gpt2::read_file(merges_txt);
    Merges merges;
    std::vector<std::size_t> lines;
    std::size_t line_number = 0;
    for (std::size_t begin = 0; begin < text.size();) {
      std::size_t end = text.find('\n', begin);
      if (end == std::string::npos) end = text.size();
      std::string_view line(text.data() + begin, end - begin);
      begin = end + 1;
      ++line_number;
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (line_number == 1 && line.starts_with("#version")) continue;
      if (line.find_first_not_of(" \t") == std::string_view::npos) continue;
      auto merge = detail::gpt2::split_merge(line);
      if (!merge) {
        detail::fail("tokenizer: {}: line {}: expected two space-separated tokens, got '{}'", merges_txt.string(),
                     line_number, line);
      }
      merges.push_back(std::move(*merge));
      lines.push_back(line_number);
    }
    detail::gpt2::Source source{
        vocab_json.string(),
        [&](std::size_t i) { return fmt::format("{}: line {}", merges_txt.string(), lines.at(i)); }};
    return GPT2Tokenizer(std::move(vocab), std::move(merges), std::move(special_tokens), source);
  }

  /// Loads a Hugging Face tokenizer.json: model.type must be "BPE" when present, model.vocab an object token -> id,
  /// model.merges either ["a b", ...] or [["a", "b"], ...]; every entry of added_tokens ({id, content, ...}) becomes
  /// a special token with its id.
  static GPT2Tokenizer from_tokenizer_json(const std::filesystem::path& tokenizer_json) {
    const std::string file = tokenizer_json.string();
    const nlohmann::json json = detail::gpt2::read_json(tokenizer_json);
    if (!json.is_object()) detail::fail("tokenizer: {}: expected a JSON object, got {}", file, json.type_name());
    if (!json.contains("model") || !json["model"].is_object()) {
      detail::fail("tokenizer: {}: expected a 'model' object", file);
    }
    const nlohmann::json& model = json["model"];
    if (model.contains("type") && !(model["type"].is_string() && model["type"].get<std::string>() == "BPE")) {
      detail::fail("tokenizer: {}: model.type is {}, expected \"BPE\"", file, model["type"].dump());
    }
    if (model.contains("ignore_merges") && model["ignore_merges"].is_boolean() &&
        model["ignore_merges"].get<bool>()) {
      detail::fail("tokenizer: {}: model.ignore_merges is true, which GPT-2's BPE does not support", file);
    }
    const nlohmann::json& vocab_json = model.contains("vocab") ? model["vocab"] : nlohmann::json();
    Vocab vocab = detail::gpt2::vocab_from_json(vocab_json, file + ": model.vocab");

    const nlohmann::json& merges_json = model.contains("merges") ? model["merges"] : nlohmann::json();
    if (!merges_json.is_array()) {
      detail::fail("tokenizer: {}: model.merges: expected an array, got {}", file, merges_json.type_name());
    }
    Merges merges;
    merges.reserve(merges_json.size());
    for (std::size_t i = 0; i < merges_json.size(); ++i) {
      const nlohmann::json& item = merges_json[i];
      if (item.is_string()) {
        auto merge = detail::gpt2::split_merge(item.get<std::string>());
        if (!merge) {
          detail::fail("tokenizer: {}: model.merges[{}]: expected two space-separated tokens, got '{}'", file, i,
                       item.get<std::string>());
        }
        merges.push_back(std::move(*merge));
      } else if (item.is_array() && item.size() == 2 && item[0].is_string() && item[1].is_string() &&
                 !item[0].get<std::string>().empty() && !item[1].get<std::string>().empty()) {
        merges.emplace_back(item[0].get<std::string>(), item[1].get<std::string>());
      } else {
        detail::fail("tokenizer: {}: model.merges[{}]: expected \"a b\" or [\"a\", \"b\"], got {}", file, i,
                     item.dump());
      }
    }

    std::vector<std::string> special_tokens;
    if (json.contains("added_tokens") && !json["added_tokens"].is_null()) {
      const nlohmann::json& added = json["added_tokens"];
      if (!added.is_array()) {
        detail::fail("tokenizer: {}: added_tokens: expected an array, got {}", file, added.type_name());
      }
      for (std::size_t i = 0; i < added.size(); ++i) {
        const nlohmann::json& entry = added[i];
        if (!entry.is_object() || !entry.contains("id") || !entry["id"].is_number_integer() ||
            !entry.contains("content") || !entry["content"].is_string()) {
          detail::fail("tokenizer: {}: added_tokens[{}]: expected an object with an integer 'id' and a string "
                       "'content', got {}",
                       file, i, entry.dump());
        }
        const std::string content = entry["content"].get<std::string>();
        const int64_t id = entry["id"].get<int64_t>();
        if (auto it = vocab.find(content); it != vocab.end() && it->second != id) {
          detail::fail("tokenizer: {}: added_tokens[{}]: '{}' has id {}, but model.vocab gives it id {}", file, i,
                       content, id, it->second);
        }
        vocab.emplace(content, id);
        special_tokens.push_back(content);
      }
    }
    detail::gpt2::Source source{file + ": model.vocab",
                                [&](std::size_t i) { return fmt::format("{}: model.merges[{}]", file, i); }};
    return GPT2Tokenizer(std::move(vocab), std::move(merges), std::move(special_tokens), source);
  }

  /// Loads a tokenizer folder: tokenizer.json if present, else vocab.json + merges.txt (with the special tokens of
  /// special_tokens_map.json when there is one, else "<|endoftext|>").
  static GPT2Tokenizer from_pretrained(const std::filesystem::path& dir) {
    std::error_code ec;
    if (!std::filesystem::is_directory(dir, ec)) {
      detail::fail("tokenizer: {}: no such directory (looked for tokenizer.json, or vocab.json + merges.txt)",
                   dir.string());
    }
    if (std::filesystem::exists(dir / "tokenizer.json", ec)) return from_tokenizer_json(dir / "tokenizer.json");
    const bool has_vocab = std::filesystem::exists(dir / "vocab.json", ec);
    const bool has_merges = std::filesystem::exists(dir / "merges.txt", ec);
    if (!has_vocab || !has_merges) {
      detail::fail("tokenizer: {}: no tokenizer files: looked for tokenizer.json, or vocab.json + merges.txt{}",
                   dir.string(),
                   has_vocab    ? " (merges.txt is missing)"
                   : has_merges ? " (vocab.json is missing)"
                                : "");
    }
    std::vector<std::string> special_tokens{std::string(detail::gpt2::kEndOfText)};
    if (std::filesystem::exists(dir / "special_tokens_map.json", ec)) {
      special_tokens = detail::gpt2::special_tokens_from_map(dir / "special_tokens_map.json");
    }
    return from_files(dir / "vocab.json", dir / "merges.txt", std::move(special_tokens));
  }

  /// The built-in byte-level tokenizer of tiny test models: no merges, id i is the token of byte
  /// detail::gpt2::byte_order()[i] (GPT-2's own ids for single bytes: '!' = 0, 'A' = 32, ' ' = 220, '\n' = 198), and
  /// "<|endoftext|>" = 256. vocab_size() == 257.
  static GPT2Tokenizer byte_level() {
    Vocab vocab;
    for (int i = 0; i < 256; ++i) vocab.emplace(detail::gpt2::byte_tokens()[detail::gpt2::byte_order()[i]], i);
    vocab.emplace(std::string(detail::gpt2::kEndOfText), 256);
    return GPT2Tokenizer(std::move(vocab), {});
  }

  /// Token ids of text. With allow_special, each occurrence of a special token (leftmost first, longest on a tie)
  /// becomes its id; otherwise special tokens are encoded as the plain text they are.
  std::vector<int64_t> encode(std::string_view text, bool allow_special = false) const {
    std::vector<int64_t> ids;
    ids.reserve(text.size() / 3 + 1);
    if (allow_special && !specials_.empty()) {
      encode_with_specials(text, ids);
    } else {
      encode_ordinary(text, ids);
    }
    return ids;
  }

  /// The exact bytes of ids: byte-level tokens give their bytes, special tokens their text. rlhf::Error naming the
  /// id if one is not in the vocab.
  std::string decode(std::span<const int64_t> ids) const {
    std::size_t size = 0;
    for (int64_t id : ids) size += bytes_of(id).size();
    std::string out;
    out.reserve(size);
    for (int64_t id : ids) out += bytes_of(id);
    return out;
  }

  /// The token strings (byte-level form, e.g. "Ġthe") of encode(text, allow_special), for debugging.
  std::vector<std::string> tokenize(std::string_view text, bool allow_special = false) const {
    std::vector<std::string> tokens;
    for (int64_t id : encode(text, allow_special)) tokens.push_back(id_to_token(id));
    return tokens;
  }

  /// The pre-tokens of text (raw bytes, before BPE), e.g. "a  b" -> {"a", " ", " b"}; special tokens not split off.
  std::vector<std::string> pre_tokenize(std::string_view text) const {
    std::vector<std::string> pieces;
    pre_tokenizer_.split(text, [&](std::string_view piece) { pieces.emplace_back(piece); });
    return pieces;
  }

  /// One more than the largest id (the rows a model's embedding needs): 50257 for GPT-2.
  int64_t vocab_size() const { return static_cast<int64_t>(id_to_token_.size()); }

  /// Id of "<|endoftext|>" (50256 for GPT-2, 256 for byte_level()); rlhf::Error if the vocab has no such token.
  int64_t eos_id() const {
    if (auto id = token_to_id(detail::gpt2::kEndOfText)) return *id;
    detail::fail("tokenizer: the vocab has no '{}' token, so there is no eos id", detail::gpt2::kEndOfText);
  }

  /// Id of a token string (byte-level form, or a special token), or nullopt.
  std::optional<int64_t> token_to_id(std::string_view token) const {
    if (auto it = token_to_id_.find(token); it != token_to_id_.end()) return it->second;
    return std::nullopt;
  }

  /// Token string of an id; rlhf::Error naming the id if it is not in the vocab.
  std::string id_to_token(int64_t id) const {
    check_id(id);
    return id_to_token_[static_cast<std::size_t>(id)];
  }

  /// The special tokens, in the order given.
  const std::vector<std::string>& special_tokens() const { return special_tokens_; }

  /// The merge rules in rank order.
  const Merges& merges() const { return merges_; }

  /// The vocab as token -> id.
  Vocab vocab() const {
    Vocab vocab;
    vocab.reserve(token_to_id_.size());
    for (const auto& [token, id] : token_to_id_) vocab.emplace(token, id);
    return vocab;
  }

  /// Empties the cache of BPE results (for benchmarks; it is bounded and needs no clearing otherwise).
  void clear_cache() const {
    std::lock_guard<std::mutex> lock(cache_->mutex);
    cache_->clear();
  }

  /// Writes dir/vocab.json (token -> id in id order), dir/merges.txt ("#version: 0.2" then one merge a line) and
  /// dir/special_tokens_map.json (so from_pretrained(dir) restores the special tokens), creating dir if needed.
  /// Each file is written atomically: a temporary file in dir, flushed and fsynced, renamed over the target.
  void save_pretrained(const std::filesystem::path& dir) const {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) detail::fail("tokenizer: cannot create directory {}: {}", dir.string(), ec.message());

    std::string merges = "#version: 0.2\n";
    for (const auto& [left, right] : merges_) merges += left + " " + right + "\n";
    nlohmann::ordered_json special_map = nlohmann::ordered_json::object();
    const bool has_eot = std::find(special_tokens_.begin(), special_tokens_.end(), detail::gpt2::kEndOfText) !=
                         special_tokens_.end();
    if (has_eot) {
      for (const char* key : {"bos_token", "eos_token", "unk_token"}) special_map[key] = detail::gpt2::kEndOfText;
    }
    special_map["additional_special_tokens"] = special_tokens_;

    std::string vocab_text = "{", special_text;
    try {
      for (std::size_t id = 0; id < id_to_token_.size(); ++id) {  // in id order, each key escaped by nlohmann
        if (!has_id_[id]) continue;
        if (vocab_text.size() > 1) vocab_text += ",";
        vocab_text += nlohmann::json(id_to_token_[id]).dump() + ":" + std::to_string(id);
      }
      vocab_text += "}";
      special_text = special_map.dump(2) + "\n";
    } catch (const nlohmann::json::exception& e) {
      detail::fail("tokenizer: cannot save to {}: {}", dir.string(), e.what());
    }
    write_file_atomic(dir / "vocab.json", vocab_text);
    write_file_atomic(dir / "merges.txt", merges);
    write_file_atomic(dir / "special_tokens_map.json", special_text);
  }

  /// True when PCRE2's JIT compiled the pre-tokenisation pattern.
  bool jit() const { return pre_tokenizer_.jit(); }

 private:
  GPT2Tokenizer(Vocab vocab, Merges merges, std::vector<std::string> special_tokens,
                const detail::gpt2::Source& source)
      : merges_(std::move(merges)), cache_(std::make_shared<detail::gpt2::BpeCache>()) {
    build_vocab(std::move(vocab), source);
    add_special_tokens(std::move(special_tokens));
    build_merges(source);
    for (int b = 0; b < 256; ++b) {
      auto id = token_to_id(detail::gpt2::byte_tokens()[b]);
      byte_ids_[b] = id ? static_cast<int32_t>(*id) : -1;
    }
  }

  // ---- construction ----

  void build_vocab(Vocab vocab, const detail::gpt2::Source& source) {
    if (vocab.empty()) detail::fail("tokenizer: {}: the vocab is empty", source.vocab);
    // Sorted so that errors are deterministic.
    std::vector<std::pair<std::string, int64_t>> entries(std::make_move_iterator(vocab.begin()),
                                                         std::make_move_iterator(vocab.end()));
    std::sort(entries.begin(), entries.end());
    int64_t max_id = -1;
    for (const auto& [token, id] : entries) {
      if (id < 0 || id >= detail::gpt2::kMaxTokenId) {
        detail::fail("tokenizer: {}: token '{}' has id {}, expected 0 <= id < {}", source.vocab, token, id,
                     detail::gpt2::kMaxTokenId);
      }
      if (token.empty()) detail::fail("tokenizer: {}: the empty string has id {}", source.vocab, id);
      max_id = std::max(max_id, id);
    }
    id_to_token_.assign(static_cast<std::size_t>(max_id + 1), std::string());
    has_id_.assign(static_cast<std::size_t>(max_id + 1), false);
    token_to_id_.reserve(entries.size());
    for (auto& [token, id] : entries) {
      const auto index = static_cast<std::size_t>(id);
      if (has_id_[index]) {
        detail::fail("tokenizer: {}: id {} is used by both '{}' and '{}'", source.vocab, id, id_to_token_[index],
                     token);
      }
      has_id_[index] = true;
      id_to_token_[index] = token;
      token_to_id_.emplace(std::move(token), id);
    }
  }

  void add_special_tokens(std::vector<std::string> special_tokens) {
    for (std::string& token : special_tokens) {
      if (token.empty()) detail::fail("tokenizer: a special token is the empty string");
      if (std::find(special_tokens_.begin(), special_tokens_.end(), token) != special_tokens_.end()) continue;
      int64_t id = vocab_size();
      if (auto existing = token_to_id(token)) {
        id = *existing;
      } else {
        if (id >= detail::gpt2::kMaxTokenId) detail::fail("tokenizer: no id left for special token '{}'", token);
        id_to_token_.push_back(token);
        has_id_.push_back(true);
        token_to_id_.emplace(token, id);
      }
      specials_.emplace_back(token, id);
      special_tokens_.push_back(std::move(token));
    }
    id_bytes_.resize(id_to_token_.size());
    for (std::size_t id = 0; id < id_to_token_.size(); ++id) {
      if (!has_id_[id]) continue;
      const std::string& token = id_to_token_[id];
      const bool special = std::find(special_tokens_.begin(), special_tokens_.end(), token) != special_tokens_.end();
      auto bytes = special ? std::nullopt : detail::gpt2::token_to_bytes(token);
      id_bytes_[id] = bytes ? std::move(*bytes) : token;
    }
  }

  void build_merges(const detail::gpt2::Source& source) {
    merge_table_.reserve(merges_.size());
    for (std::size_t rank = 0; rank < merges_.size(); ++rank) {
      const std::string& left = merges_[rank].first;
      const std::string& right = merges_[rank].second;
      const auto fail_missing = [&](const std::string& what) {
        detail::fail("tokenizer: {}: merge '{} {}': {} is not in the vocab", source.merge(rank), left, right, what);
      };
      const auto left_id = token_to_id(left);
      if (!left_id) fail_missing(fmt::format("'{}'", left));
      const auto right_id = token_to_id(right);
      if (!right_id) fail_missing(fmt::format("'{}'", right));
      const auto merged_id = token_to_id(left + right);
      if (!merged_id) fail_missing(fmt::format("the merged token '{}'", left + right));
      if (rank >= static_cast<std::size_t>(std::numeric_limits<int32_t>::max())) {
        detail::fail("tokenizer: {}: too many merges", source.merge(rank));
      }
      merge_table_.insert(static_cast<int32_t>(*left_id), static_cast<int32_t>(*right_id),
                          {static_cast<int32_t>(*merged_id), static_cast<int32_t>(rank)});
    }
  }

  // ---- encoding ----

  void encode_ordinary(std::string_view text, std::vector<int64_t>& ids) const {
    std::vector<int32_t> word;
    pre_tokenizer_.split(text, [&](std::string_view piece) { encode_piece(piece, ids, word); });
  }

  void encode_with_specials(std::string_view text, std::vector<int64_t>& ids) const {
    std::vector<std::size_t> next(specials_.size(), 0);  // next occurrence of each special token at or after pos
    std::vector<bool> searched(specials_.size(), false);
    std::size_t pos = 0;
    while (pos < text.size()) {
      std::size_t best = std::string_view::npos;
      std::size_t best_index = 0;
      for (std::size_t k = 0; k < specials_.size(); ++k) {
        if (!searched[k] || (next[k] != std::string_view::npos && next[k] < pos)) {
          next[k] = text.find(specials_[k].first, pos);
          searched[k] = true;
        }
        if (next[k] == std::string_view::npos) continue;
        if (next[k] < best || (next[k] == best && specials_[k].first.size() > specials_[best_index].first.size())) {
          best = next[k];
          best_index = k;
        }
      }
      if (best == std::string_view::npos) {
        encode_ordinary(text.substr(pos), ids);
        return;
      }
      encode_ordinary(text.substr(pos, best - pos), ids);
      ids.push_back(specials_[best_index].second);
      pos = best + specials_[best_index].first.size();
    }
  }

  int32_t byte_id(char c) const {
    const int32_t id = byte_ids_[static_cast<uint8_t>(c)];
    if (id < 0) {
      detail::fail("tokenizer: byte 0x{:02x} has no token in the vocab (expected '{}')", static_cast<uint8_t>(c),
                   detail::gpt2::byte_tokens()[static_cast<uint8_t>(c)]);
    }
    return id;
  }

  void encode_piece(std::string_view piece, std::vector<int64_t>& ids, std::vector<int32_t>& word) const {
    if (piece.size() == 1) {
      ids.push_back(byte_id(piece[0]));
      return;
    }
    const bool cacheable = piece.size() <= detail::gpt2::kMaxCachedPieceBytes;
    const uint64_t hash = cacheable ? std::hash<std::string_view>{}(piece) : 0;
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_->mutex);
      if (cache_->find(piece, hash, ids)) return;
    }
    word.clear();
    for (char c : piece) word.push_back(byte_id(c));
    detail::gpt2::bpe(word, merge_table_);
    ids.insert(ids.end(), word.begin(), word.end());
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_->mutex);
      cache_->insert(piece, hash, word);
    }
  }

  // ---- ids ----

  void check_id(int64_t id) const {
    if (id < 0 || id >= vocab_size() || !has_id_[static_cast<std::size_t>(id)]) {
      detail::fail("tokenizer: id {} is not in the vocab (vocab_size {})", id, vocab_size());
    }
  }

  const std::string& bytes_of(int64_t id) const {
    check_id(id);
    return id_bytes_[static_cast<std::size_t>(id)];
  }

  std::unordered_map<std::string, int64_t, detail::gpt2::StringHash, std::equal_to<>> token_to_id_;
  std::vector<std::string> id_to_token_;  // "" where has_id_ is false
  std::vector<bool> has_id_;
  std::vector<std::string> id_bytes_;  // the bytes each id decodes to
  std::array<int32_t, 256> byte_ids_{};  // byte -> id of its byte token, -1 if the vocab lacks it
  Merges merges_;
  detail::gpt2::MergeTable merge_table_;
  std::vector<std::string> special_tokens_;
  std::vector<std::pair<std::string, int64_t>> specials_;  // special token -> id
  detail::gpt2::PreTokenizer pre_tokenizer_;
  std::shared_ptr<detail::gpt2::BpeCache> cache_;
};

}  // namespace rlhf
