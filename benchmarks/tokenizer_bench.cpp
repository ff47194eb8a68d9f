// Encoding speed of rlhf::GPT2Tokenizer on generated mixed text (ASCII prose, digits, punctuation, whitespace runs,
// CJK, emoji and a few invalid UTF-8 bytes). By default the tokenizer is built in code: byte tokens plus merges
// learnt by a small BPE trainer on a sample of the text; --tokenizer DIR loads real files instead.
//
//   g++ -std=c++20 -O2 -Iinclude benchmarks/tokenizer_bench.cpp $(pkg-config --cflags --libs libpcre2-8) -lfmt
//   ./a.out [--mb 4] [--merges 2000] [--repeats 3] [--tokenizer DIR]
//
// Prints one line of JSON, then a readable summary.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <unordered_map>
#include <random>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <rlhf/tokenizer/gpt2_tokenizer.hpp>

namespace {

// ---- text ----

void append_code_point(char32_t c, std::string& out) { rlhf::detail::gpt2::append_utf8(c, out); }

/// About `bytes` bytes of mixed text, the same for a given seed.
std::string generate_text(std::size_t bytes, uint64_t seed) {
  static const std::vector<std::string> kWords = {
      "the",     "of",       "and",    "to",       "in",      "a",        "is",        "that",    "for",
      "it",      "as",       "was",    "with",     "be",      "by",       "on",        "not",     "he",
      "I",       "this",     "are",    "or",       "his",     "from",     "at",        "which",   "but",
      "have",    "an",       "had",    "they",     "you",     "were",     "their",     "one",     "all",
      "we",      "can",      "her",    "has",      "there",   "been",     "if",        "more",    "when",
      "will",    "would",    "who",    "so",       "no",      "policy",   "reward",    "model",   "gradient",
      "token",   "training", "value",  "function", "learning", "human",   "feedback",  "language", "The",
      "However", "Although", "Model",  "PPO",      "KL",      "don't",    "it's",      "I'll",    "we've",
      "they're", "couldn't", "naïve",  "café",     "résumé",  "Straße",   "Ελληνικά",  "русский", "Zürich"};
  static const std::vector<std::string> kPunctuation = {".", ",", ";", ":", "!", "?", "\"", "(", ")", "-", "--",
                                                        "...", "'", "/", "#", "%", "&", "*", "[", "]", "{", "}"};
  static const std::vector<std::string> kSpaces = {" ", " ", " ", " ", "  ", "\n", "\n\n", "\t", "    ", "\r\n",
                                                   "   \n", " \t "};
  std::mt19937_64 rng(seed);
  const auto pick = [&](const std::vector<std::string>& list) -> const std::string& {
    return list[std::uniform_int_distribution<std::size_t>(0, list.size() - 1)(rng)];
  };
  const auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  std::string text;
  text.reserve(bytes + 64);
  while (text.size() < bytes) {
    const int kind = uniform(0, 99);
    if (kind < 60) {  // prose
      text += pick(kWords);
      text += uniform(0, 9) == 0 ? pick(kPunctuation) : "";
      text += " ";
    } else if (kind < 70) {  // numbers
      const int digits = uniform(1, 8);
      for (int i = 0; i < digits; ++i) text.push_back(static_cast<char>('0' + uniform(0, 9)));
      text += uniform(0, 3) == 0 ? "." : " ";
    } else if (kind < 78) {  // punctuation
      text += pick(kPunctuation);
      text += pick(kPunctuation);
    } else if (kind < 88) {  // whitespace runs
      text += pick(kSpaces);
    } else if (kind < 95) {  // CJK
      const int n = uniform(1, 8);
      for (int i = 0; i < n; ++i) append_code_point(static_cast<char32_t>(uniform(0x4E00, 0x9FFF)), text);
      text += uniform(0, 1) == 0 ? "\xE3\x80\x82" : "";  // "。"
    } else if (kind < 99) {  // emoji, sometimes joined
      append_code_point(static_cast<char32_t>(uniform(0x1F300, 0x1FAFF)), text);
      if (uniform(0, 3) == 0) {
        append_code_point(0x200D, text);
        append_code_point(static_cast<char32_t>(uniform(0x1F300, 0x1F5FF)), text);
      }
      text += " ";
    } else {  // invalid UTF-8
      text += "\xFF\xFE";
    }
  }
  return text;
}

// ---- a tokenizer built in code ----

/// GPT-2 style tokenizer for `text`: the 256 byte tokens (GPT-2's byte order), `n_merges` merges learnt by plain BPE
/// on the pre-tokens of text (most frequent pair first, ties to the pair of smaller ids), and "<|endoftext|>".
rlhf::GPT2Tokenizer train_tokenizer(const std::string& text, int n_merges) {
  const rlhf::GPT2Tokenizer base = rlhf::GPT2Tokenizer::byte_level();
  std::unordered_map<std::string, int64_t> counts;
  for (const std::string& piece : base.pre_tokenize(text)) ++counts[piece];
  std::vector<std::string> tokens;  // id -> token string
  for (int i = 0; i < 256; ++i) tokens.push_back(rlhf::detail::gpt2::byte_tokens()[rlhf::detail::gpt2::byte_order()[i]]);
  std::vector<std::pair<std::vector<int32_t>, int64_t>> words;  // distinct pre-tokens as ids, with their counts
  for (const auto& [piece, count] : counts) {
    const std::vector<int64_t> ids = base.encode(piece);
    words.emplace_back(std::vector<int32_t>(ids.begin(), ids.end()), count);
  }
  std::unordered_map<std::string, int32_t> ids_of;  // token string -> id, as two pairs can make the same string
  for (std::size_t id = 0; id < tokens.size(); ++id) ids_of.emplace(tokens[id], static_cast<int32_t>(id));
  const auto pack = [](int32_t a, int32_t b) { return (uint64_t{static_cast<uint32_t>(a)} << 32) | uint32_t(b); };

  rlhf::GPT2Tokenizer::Merges merges;
  std::unordered_map<uint64_t, int64_t> pairs;
  for (int m = 0; m < n_merges; ++m) {
    pairs.clear();
    for (const auto& [symbols, count] : words) {
      for (std::size_t i = 0; i + 1 < symbols.size(); ++i) pairs[pack(symbols[i], symbols[i + 1])] += count;
    }
    if (pairs.empty()) break;
    std::pair<uint64_t, int64_t> best = *pairs.begin();
    for (const auto& entry : pairs) {
      if (entry.second > best.second || (entry.second == best.second && entry.first < best.first)) best = entry;
    }
    const auto left = static_cast<int32_t>(best.first >> 32);
    const auto right = static_cast<int32_t>(best.first & 0xFFFFFFFFu);
    merges.emplace_back(tokens[left], tokens[right]);
    const auto [it, added] = ids_of.emplace(tokens[left] + tokens[right], static_cast<int32_t>(tokens.size()));
    if (added) tokens.push_back(it->first);
    const int32_t merged = it->second;
    for (auto& [symbols, count] : words) {
      std::size_t out = 0;
      for (std::size_t i = 0; i < symbols.size(); ++i) {
        if (i + 1 < symbols.size() && symbols[i] == left && symbols[i + 1] == right) {
          symbols[out++] = merged;
          ++i;
        } else {
          symbols[out++] = symbols[i];
        }
      }
      symbols.resize(out);
    }
  }
  rlhf::GPT2Tokenizer::Vocab vocab;
  for (std::size_t id = 0; id < tokens.size(); ++id) vocab.emplace(tokens[id], static_cast<int64_t>(id));
  vocab.emplace("<|endoftext|>", static_cast<int64_t>(tokens.size()));
  return rlhf::GPT2Tokenizer(std::move(vocab), std::move(merges));
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"rlhf::GPT2Tokenizer encoding speed"};
  double megabytes = 4.0;
  int n_merges = 2000;
  int repeats = 3;
  uint64_t seed = 1234;
  std::string tokenizer_dir;
  app.add_option("--mb", megabytes, "size of the generated text in MB")->check(CLI::PositiveNumber);
  app.add_option("--merges", n_merges, "merges the built-in tokenizer learns")->check(CLI::NonNegativeNumber);
  app.add_option("--repeats", repeats, "timed encodings with a warm cache (the best one is reported)")
      ->check(CLI::PositiveNumber);
  app.add_option("--seed", seed, "seed of the generated text");
  app.add_option("--tokenizer", tokenizer_dir, "folder with tokenizer.json or vocab.json + merges.txt")
      ->check(CLI::ExistingDirectory);
  CLI11_PARSE(app, argc, argv);

  try {
    const std::string text = generate_text(static_cast<std::size_t>(megabytes * 1e6), seed);
    const auto build_start = std::chrono::steady_clock::now();
    const rlhf::GPT2Tokenizer tokenizer = tokenizer_dir.empty()
                                              ? train_tokenizer(text.substr(0, 100'000), n_merges)
                                              : rlhf::GPT2Tokenizer::from_pretrained(tokenizer_dir);
    const double build_seconds = seconds_since(build_start);
    const std::string name =
        tokenizer_dir.empty() ? fmt::format("built-in ({} merges)", tokenizer.merges().size()) : tokenizer_dir;

    tokenizer.clear_cache();
    auto start = std::chrono::steady_clock::now();
    std::vector<int64_t> ids = tokenizer.encode(text);
    const double cold_seconds = seconds_since(start);
    double warm_seconds = 1e300;
    for (int r = 0; r < repeats; ++r) {
      start = std::chrono::steady_clock::now();
      ids = tokenizer.encode(text);
      warm_seconds = std::min(warm_seconds, seconds_since(start));
    }
    start = std::chrono::steady_clock::now();
    const std::string decoded = tokenizer.decode(ids);
    const double decode_seconds = seconds_since(start);
    if (decoded != text) {
      fmt::print(stderr, "tokenizer_bench: decode(encode(text)) != text\n");
      return 1;
    }

    const double mb = static_cast<double>(text.size()) / 1e6;
    const auto tokens = static_cast<double>(ids.size());
    nlohmann::ordered_json result = {{"benchmark", "tokenizer_encode"},
                                     {"tokenizer", name},
                                     {"jit", tokenizer.jit()},
                                     {"bytes", text.size()},
                                     {"tokens", ids.size()},
                                     {"build_s", build_seconds},
                                     {"encode_cold_s", cold_seconds},
                                     {"encode_s", warm_seconds},
                                     {"encode_mb_per_s", mb / warm_seconds},
                                     {"encode_tokens_per_s", tokens / warm_seconds},
                                     {"encode_cold_mb_per_s", mb / cold_seconds},
                                     {"decode_mb_per_s", mb / decode_seconds}};
    fmt::print("{}\n", result.dump());
    fmt::print("{}: encoded {:.2f} MB into {} tokens ({:.2f} bytes/token): {:.1f} MB/s, {:.2f} M tokens/s "
               "(first pass, cold cache: {:.1f} MB/s); decode {:.0f} MB/s\n",
               name, mb, ids.size(), static_cast<double>(text.size()) / tokens, mb / warm_seconds,
               tokens / warm_seconds / 1e6, mb / cold_seconds, mb / decode_seconds);
  } catch (const std::exception& e) {
    fmt::print(stderr, "tokenizer_bench: {}\n", e.what());
    return 1;
  }
  return 0;
}
