#include "test_util.hpp"  // torch first, then doctest (see there)

#include <doctest/doctest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include <rlhf/tokenizer/batch_encode.hpp>
#include <rlhf/tokenizer/gpt2_tokenizer.hpp>

namespace {

using Ids = std::vector<int64_t>;
using Pieces = std::vector<std::string>;

// ---- a small GPT-2 style tokenizer, written independently of the library ----

/// GPT-2's bytes_to_unicode() as in encoder.py: printable bytes map to themselves, the others to 256, 257, ...
std::vector<std::pair<int, std::string>> gpt2_byte_tokens() {
  std::vector<int> bs;
  for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
  for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
  for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
  std::vector<int> cs = bs;
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    if (std::find(bs.begin(), bs.end(), b) == bs.end()) {
      bs.push_back(b);
      cs.push_back(256 + n++);
    }
  }
  std::vector<std::pair<int, std::string>> result;  // (byte, UTF-8 of its character), in GPT-2's id order
  for (std::size_t i = 0; i < bs.size(); ++i) {
    std::string utf8;
    const int c = cs[i];
    if (c < 0x80) {
      utf8.push_back(static_cast<char>(c));
    } else {
      utf8.push_back(static_cast<char>(0xC0 | (c >> 6)));
      utf8.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
    result.emplace_back(bs[i], utf8);
  }
  return result;
}

// Byte ids (GPT-2's): a printable ASCII character c has id c - 33; byte b <= 0x20 has id 188 + b.
constexpr int64_t kSpace = 220, kNewline = 198, kReturn = 201, kTab = 197;
constexpr int64_t id_of(char c) { return static_cast<int64_t>(c) - 33; }

/// Merges of the test tokenizer in rank order; merge k makes the token of id 256 + k.
const std::vector<std::pair<std::string, std::string>> kMerges = {
    {"Ġ", "t"},     // 256 Ġt
    {"h", "e"},     // 257 he
    {"Ġt", "he"},   // 258 Ġthe
    {"i", "n"},     // 259 in
    {"Ġ", "a"},     // 260 Ġa
    {"r", "e"},     // 261 re
    {"o", "n"},     // 262 on
    {"e", "r"},     // 263 er
    {"Ġ", "w"},     // 264 Ġw
    {"o", "r"},     // 265 or
    {"l", "d"},     // 266 ld
    {"Ġw", "or"},   // 267 Ġwor
    {"Ġwor", "ld"}, // 268 Ġworld
    {"Ġ", "Ġ"},     // 269 ĠĠ
    {"1", "2"},     // 270 12
    {"'", "t"},     // 271 't
    {"l", "l"},     // 272 ll
    {"'", "ll"},    // 273 'll
    {"Ġ", "1"},     // 274 Ġ1
    {"a", "a"},     // 275 aa
    {"aa", "a"},    // 276 aaa
};
constexpr int64_t kEndOfTextId = 256 + 21;  // 277

/// vocab.json of the test tokenizer: the 256 byte tokens, the merged tokens, "<|endoftext|>".
nlohmann::json test_vocab_json() {
  nlohmann::json vocab = nlohmann::json::object();
  int64_t id = 0;
  for (const auto& [byte, token] : gpt2_byte_tokens()) vocab[token] = id++;
  for (const auto& [left, right] : kMerges) vocab[left + right] = id++;
  vocab["<|endoftext|>"] = id;
  return vocab;
}

std::string test_merges_txt() {
  std::string text = "#version: 0.2\n";
  for (const auto& [left, right] : kMerges) text += left + " " + right + "\n";
  return text;
}

void write(const std::filesystem::path& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary);
  out << content;
  REQUIRE(out.good());
}

/// A temp dir with the test tokenizer's vocab.json and merges.txt.
struct TestFiles {
  rlhf::test::TempDir dir;
  std::filesystem::path vocab = dir.path() / "vocab.json";
  std::filesystem::path merges = dir.path() / "merges.txt";
  TestFiles() {
    write(vocab, test_vocab_json().dump());
    write(merges, test_merges_txt());
  }
  rlhf::GPT2Tokenizer load() const { return rlhf::GPT2Tokenizer::from_files(vocab, merges); }
};

/// Strings that exercise every part of the pre-tokeniser and the byte fallback.
const std::vector<std::string> kTrickyStrings = {
    "",
    " ",
    "Hello world",
    "the the  the\n\nthe",
    "don't I'll 'S it's'",
    "a  b   c    ",
    "\r\n\t \t",
    "12 123 1234 ½ ²",
    "x\xC2\xA0y \xE2\x80\x89z\xE1\xA0\x8Ew\xE2\x80\x8Bv\xE3\x80\x80u",
    "\xFF\xFE",
    "a\xE4\xB8"
    "b",
    "\x80\xBF lone \x80",
    "\xED\xA0\x80 surrogate \xC0\xAF overlong",
    "\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E \xF0\x9F\x8E\x89 \xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9",
    "<|endoftext|> and <|endoftext",
    std::string("nul\0byte", 8),
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
};

}  // namespace

TEST_CASE("tokenizer: byte tokens follow GPT-2's bytes_to_unicode") {
  const auto expected = gpt2_byte_tokens();
  const auto& order = rlhf::detail::gpt2::byte_order();
  for (std::size_t i = 0; i < 256; ++i) {
    CHECK(order[i] == expected[i].first);
    CHECK(rlhf::detail::gpt2::byte_tokens()[order[i]] == expected[i].second);
    CHECK(rlhf::detail::gpt2::token_to_bytes(expected[i].second) == std::string(1, static_cast<char>(order[i])));
  }
  CHECK(rlhf::detail::gpt2::bytes_to_token(" the\n") == "ĠtheĊ");
  CHECK_FALSE(rlhf::detail::gpt2::token_to_bytes("\xE2\x82\xAC").has_value());  // U+20AC stands for no byte
}

TEST_CASE("tokenizer: pre-tokenisation follows GPT-2's pattern") {
  const rlhf::GPT2Tokenizer tok = rlhf::GPT2Tokenizer::byte_level();
  SUBCASE("contractions: case-sensitive, ASCII apostrophe only") {
    CHECK(tok.pre_tokenize("don't") == Pieces{"don", "'t"});
    CHECK(tok.pre_tokenize("I'll we've they're I'm he'd") ==
          Pieces{"I", "'ll", " we", "'ve", " they", "'re", " I", "'m", " he", "'d"});
    CHECK(tok.pre_tokenize("'S") == Pieces{"'", "S"});
    CHECK(tok.pre_tokenize("DON'T") == Pieces{"DON", "'", "T"});
    CHECK(tok.pre_tokenize("it\xE2\x80\x99s") == Pieces{"it", "\xE2\x80\x99", "s"});  // U+2019 is not "'"
  }
  SUBCASE("whitespace: a run leaves its last space to the next word") {
    CHECK(tok.pre_tokenize("a  b") == Pieces{"a", " ", " b"});
    CHECK(tok.pre_tokenize("a   b") == Pieces{"a", "  ", " b"});
    CHECK(tok.pre_tokenize("a  ") == Pieces{"a", "  "});
    CHECK(tok.pre_tokenize("a\r\nb") == Pieces{"a", "\r", "\n", "b"});
    CHECK(tok.pre_tokenize("a\r\n") == Pieces{"a", "\r\n"});
    CHECK(tok.pre_tokenize("a\tb") == Pieces{"a", "\t", "b"});
    CHECK(tok.pre_tokenize("x \n y") == Pieces{"x", " \n", " y"});
    CHECK(tok.pre_tokenize("  x") == Pieces{" ", " x"});
  }
  SUBCASE("numbers and punctuation") {
    CHECK(tok.pre_tokenize("abc123 45!?") == Pieces{"abc", "123", " 45", "!?"});
    CHECK(tok.pre_tokenize(" \xC2\xBD \xC2\xB2") == Pieces{" \xC2\xBD", " \xC2\xB2"});  // ½ and ² are \p{N}
    CHECK(tok.pre_tokenize("a...b") == Pieces{"a", "...", "b"});
  }
  SUBCASE("Unicode White_Space, not PCRE2's \\s") {
    // NBSP, U+2009 and U+3000 are white space: "x \u00A0y" keeps " " apart as the run is followed by a word.
    CHECK(tok.pre_tokenize("x \xC2\xA0y") == Pieces{"x", " ", "\xC2\xA0", "y"});
    CHECK(tok.pre_tokenize("x \xE2\x80\x89y") == Pieces{"x", " ", "\xE2\x80\x89", "y"});
    CHECK(tok.pre_tokenize("a  \xE3\x80\x80") == Pieces{"a", "  \xE3\x80\x80"});
    // U+180E, U+200B and U+001C are not: the space before them joins them as punctuation.
    CHECK(tok.pre_tokenize("a  \xE1\xA0\x8E") == Pieces{"a", " ", " \xE1\xA0\x8E"});
    CHECK(tok.pre_tokenize("a  \xE2\x80\x8B") == Pieces{"a", " ", " \xE2\x80\x8B"});
    CHECK(tok.pre_tokenize("a  \x1C") == Pieces{"a", " ", " \x1C"});
  }
  SUBCASE("CJK and emoji") {
    CHECK(tok.pre_tokenize("\xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x8E\x89") ==
          Pieces{"\xE6\x97\xA5\xE6\x9C\xAC", " \xF0\x9F\x8E\x89"});
  }
  SUBCASE("invalid UTF-8: each maximal run of bad bytes is a piece") {
    CHECK(tok.pre_tokenize("\xFF\xFE") == Pieces{"\xFF\xFE"});
    CHECK(tok.pre_tokenize("a\xE4\xB8"
                           "b") == Pieces{"a", "\xE4\xB8", "b"});
    CHECK(tok.pre_tokenize("!\xFF!") == Pieces{"!", "\xFF", "!"});
    CHECK(tok.pre_tokenize("a \x80\x80 b") == Pieces{"a", " ", "\x80\x80", " b"});
    CHECK(tok.pre_tokenize("\xED\xA0\x80x") == Pieces{"\xED\xA0\x80", "x"});  // an encoded surrogate is invalid
  }
  CHECK(tok.pre_tokenize("").empty());
}

TEST_CASE("tokenizer: hand-worked BPE on a small vocab") {
  const TestFiles files;
  const rlhf::GPT2Tokenizer tok = files.load();
  REQUIRE(tok.vocab_size() == 278);
  CHECK(tok.eos_id() == kEndOfTextId);
  CHECK(tok.merges().size() == kMerges.size());

  SUBCASE("merges by rank") {
    CHECK(tok.encode("the") == Ids{id_of('t'), 257});  // h e -> he; no "t he" merge
    CHECK(tok.encode(" the") == Ids{258});              // Ġ t -> Ġt, h e -> he, Ġt he -> Ġthe
    CHECK(tok.tokenize(" the") == Pieces{"Ġthe"});
    // "Hello": l l -> ll; " world": Ġw (8), or (9), ld (10), Ġwor (11), Ġworld (12).
    CHECK(tok.encode("Hello world") == Ids{id_of('H'), id_of('e'), 272, id_of('o'), 268});
    CHECK(tok.tokenize("Hello world") == Pieces{"H", "e", "ll", "o", "Ġworld"});
    // "1 2" (rank 14) goes before "Ġ 1" (rank 18).
    CHECK(tok.encode(" 12 3") == Ids{kSpace, 270, kSpace, id_of('3')});
    CHECK(tok.encode("123") == Ids{270, id_of('3')});
  }
  SUBCASE("every occurrence of the best pair is merged in one left-to-right pass") {
    // a a a a a -> aa aa a (rank 19) -> aa aaa (rank 20)
    CHECK(tok.encode("aaaaa") == Ids{275, 276});
    CHECK(tok.encode("aaaa") == Ids{275, 275});
  }
  SUBCASE("contractions") {
    CHECK(tok.encode("don't") == Ids{id_of('d'), 262, 271});
    CHECK(tok.encode("I'll") == Ids{id_of('I'), 273});
    CHECK(tok.encode("'S") == Ids{id_of('\''), id_of('S')});
    CHECK(tok.encode("'s") == Ids{id_of('\''), id_of('s')});
  }
  SUBCASE("whitespace") {
    CHECK(tok.encode("a  b") == Ids{id_of('a'), kSpace, kSpace, id_of('b')});
    CHECK(tok.encode("a   b") == Ids{id_of('a'), 269, kSpace, id_of('b')});
    CHECK(tok.encode("a  ") == Ids{id_of('a'), 269});
    CHECK(tok.encode("\r\n") == Ids{kReturn, kNewline});
    CHECK(tok.encode("a\tb") == Ids{id_of('a'), kTab, id_of('b')});
    CHECK(tok.encode("x\xC2\xA0y") == Ids{id_of('x'), 126, 254, id_of('y')});  // 0xC2 -> 126, 0xA0 -> 254
  }
  SUBCASE("invalid UTF-8 is encoded byte by byte") {
    CHECK(tok.encode("\xFF\xFE") == Ids{187, 186});
    CHECK(tok.decode(Ids{187, 186}) == "\xFF\xFE");
  }
  SUBCASE("empty input") {
    CHECK(tok.encode("").empty());
    CHECK(tok.decode(Ids{}).empty());
  }
}

TEST_CASE("tokenizer: special tokens") {
  const TestFiles files;
  const rlhf::GPT2Tokenizer tok = files.load();
  const std::string text = "a<|endoftext|>b";
  CHECK(tok.encode(text, /*allow_special=*/true) == Ids{id_of('a'), kEndOfTextId, id_of('b')});
  const Ids plain = tok.encode(text);
  CHECK(std::find(plain.begin(), plain.end(), kEndOfTextId) == plain.end());
  CHECK(plain == Ids{id_of('a'), id_of('<'), id_of('|'), id_of('e'), id_of('n'), id_of('d'), id_of('o'), id_of('f'),
                     id_of('t'), id_of('e'), id_of('x'), id_of('t'), id_of('|'), id_of('>'), id_of('b')});
  CHECK(tok.decode(plain) == text);
  CHECK(tok.decode(tok.encode(text, true)) == text);
  CHECK(tok.encode("<|endoftext|><|endoftext|>", true) == Ids{kEndOfTextId, kEndOfTextId});
  CHECK(tok.tokenize("<|endoftext|>", true) == Pieces{"<|endoftext|>"});

  SUBCASE("leftmost, then longest; a special token missing from the vocab gets the next id") {
    rlhf::GPT2Tokenizer::Vocab vocab = test_vocab_json().get<rlhf::GPT2Tokenizer::Vocab>();
    const rlhf::GPT2Tokenizer with_extra(vocab, kMerges, {"<|endoftext|>", "<x>", "<x>y"});
    CHECK(with_extra.vocab_size() == 280);
    CHECK(with_extra.token_to_id("<x>") == 278);
    CHECK(with_extra.token_to_id("<x>y") == 279);
    CHECK(with_extra.encode("a<x>yb<x>", true) == Ids{id_of('a'), 279, id_of('b'), 278});
    CHECK(with_extra.decode(Ids{279, 278}) == "<x>y<x>");
  }
}

TEST_CASE("tokenizer: decode(encode(s)) == s") {
  const TestFiles files;
  const rlhf::GPT2Tokenizer tok = files.load();
  for (const std::string& s : kTrickyStrings) {
    CAPTURE(s);
    CHECK(tok.decode(tok.encode(s)) == s);
    CHECK(tok.decode(tok.encode(s, true)) == s);
    std::string joined;
    for (const std::string& piece : tok.pre_tokenize(s)) joined += piece;
    CHECK(joined == s);
  }
  SUBCASE("random bytes, byte_level() and the small vocab") {
    const rlhf::GPT2Tokenizer bytes = rlhf::GPT2Tokenizer::byte_level();
    std::mt19937 rng(7);
    for (int trial = 0; trial < 200; ++trial) {
      std::string s(std::uniform_int_distribution<int>(0, 64)(rng), '\0');
      for (char& c : s) c = static_cast<char>(std::uniform_int_distribution<int>(0, 255)(rng));
      const Ids ids = bytes.encode(s);
      CHECK(ids.size() == s.size());  // no merges: one id per byte
      CHECK(bytes.decode(ids) == s);
      CHECK(tok.decode(tok.encode(s)) == s);
    }
  }
}

TEST_CASE("tokenizer: byte_level() uses GPT-2's byte ids") {
  const rlhf::GPT2Tokenizer tok = rlhf::GPT2Tokenizer::byte_level();
  CHECK(tok.vocab_size() == 257);
  CHECK(tok.eos_id() == 256);
  CHECK(tok.encode("A !\n") == Ids{32, kSpace, 0, kNewline});
  CHECK(tok.encode("<|endoftext|>", true) == Ids{256});
  CHECK(tok.id_to_token(kSpace) == "Ġ");
  CHECK(tok.token_to_id("Ġ") == kSpace);
  CHECK_FALSE(tok.token_to_id("Ġt").has_value());
}

TEST_CASE("tokenizer: tokenizer.json gives the same tokenizer as vocab.json + merges.txt") {
  const TestFiles files;
  const rlhf::GPT2Tokenizer reference = files.load();
  for (const bool pair_form : {false, true}) {
    CAPTURE(pair_form);
    nlohmann::json merges = nlohmann::json::array();
    for (const auto& [left, right] : kMerges) {
      merges.push_back(pair_form ? nlohmann::json::array({left, right}) : nlohmann::json(left + " " + right));
    }
    const nlohmann::json tokenizer = {
        {"version", "1.0"},
        {"added_tokens", {{{"id", kEndOfTextId}, {"content", "<|endoftext|>"}, {"special", true}}}},
        {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"vocab", test_vocab_json()}, {"merges", merges}}}};
    const std::filesystem::path path = files.dir.path() / "tokenizer.json";
    write(path, tokenizer.dump());
    const rlhf::GPT2Tokenizer tok = rlhf::GPT2Tokenizer::from_tokenizer_json(path);
    CHECK(tok.vocab_size() == reference.vocab_size());
    CHECK(tok.merges() == reference.merges());
    CHECK(tok.special_tokens() == Pieces{"<|endoftext|>"});
    for (const std::string& s : kTrickyStrings) {
      CAPTURE(s);
      CHECK(tok.encode(s) == reference.encode(s));
      CHECK(tok.encode(s, true) == reference.encode(s, true));
    }
    // from_pretrained prefers tokenizer.json.
    CHECK(rlhf::GPT2Tokenizer::from_pretrained(files.dir.path()).encode("Hello world") ==
          reference.encode("Hello world"));
  }
}

TEST_CASE("tokenizer: save_pretrained then from_pretrained") {
  const TestFiles files;
  rlhf::GPT2Tokenizer::Vocab vocab = test_vocab_json().get<rlhf::GPT2Tokenizer::Vocab>();
  const rlhf::GPT2Tokenizer tok(vocab, kMerges, {"<|endoftext|>", "<|pad|>"});
  rlhf::test::TempDir out;
  const std::filesystem::path dir = out.path() / "saved";  // created by save_pretrained
  tok.save_pretrained(dir);
  tok.save_pretrained(dir);  // overwriting is fine

  std::ifstream merges(dir / "merges.txt");
  std::string first_line;
  std::getline(merges, first_line);
  CHECK(first_line == "#version: 0.2");
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) names.push_back(entry.path().filename());
  std::sort(names.begin(), names.end());
  CHECK(names == Pieces{"merges.txt", "special_tokens_map.json", "vocab.json"});  // no temporary files left

  const rlhf::GPT2Tokenizer loaded = rlhf::GPT2Tokenizer::from_pretrained(dir);
  CHECK(loaded.vocab_size() == tok.vocab_size());
  CHECK(loaded.special_tokens() == tok.special_tokens());
  CHECK(loaded.vocab() == tok.vocab());
  CHECK(loaded.merges() == tok.merges());
  for (const std::string& s : kTrickyStrings) {
    CAPTURE(s);
    CHECK(loaded.encode(s) == tok.encode(s));
  }
  CHECK(loaded.encode("<|pad|><|endoftext|>", true) == Ids{278, kEndOfTextId});
  // Plain vocab.json + merges.txt, as OpenAI ships them, load too.
  CHECK(rlhf::GPT2Tokenizer::from_files(dir / "vocab.json", dir / "merges.txt").encode(" the") == Ids{258});
}

TEST_CASE("tokenizer: the heap BPE gives the reference BPE's result") {
  // Random merge tables over a 4-symbol alphabet, ranks in any order (not only as BPE training makes them).
  std::mt19937 rng(11);
  for (int table = 0; table < 50; ++table) {
    rlhf::detail::gpt2::MergeTable merges;
    std::vector<int32_t> symbols = {0, 1, 2, 3};
    const int n_rules = std::uniform_int_distribution<int>(1, 30)(rng);
    std::vector<int32_t> ranks(n_rules);
    for (int r = 0; r < n_rules; ++r) ranks[r] = r;
    std::shuffle(ranks.begin(), ranks.end(), rng);
    for (int r = 0; r < n_rules; ++r) {
      std::uniform_int_distribution<std::size_t> pick(0, symbols.size() - 1);
      const int32_t merged = static_cast<int32_t>(100 + r);
      merges.insert(symbols[pick(rng)], symbols[pick(rng)], {merged, ranks[r]});
      symbols.push_back(merged);
    }
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<int32_t> word(std::uniform_int_distribution<int>(0, 120)(rng));
      for (int32_t& s : word) s = std::uniform_int_distribution<int32_t>(0, 3)(rng);
      std::vector<int32_t> expected = word;
      rlhf::detail::gpt2::bpe_reference(expected, merges);
      std::vector<int32_t> got = word;
      rlhf::detail::gpt2::bpe_heap(got, merges);
      CHECK(got == expected);
    }
  }
}

TEST_CASE("tokenizer: one tokenizer encodes from several threads") {
  const TestFiles files;
  const rlhf::GPT2Tokenizer tok = files.load();
  std::string text;
  for (int i = 0; i < 300; ++i) text += "the world's " + std::to_string(i * 7919) + " aaaa  \xF0\x9F\x8E\x89\n";
  const Ids expected = tok.encode(text);
  tok.clear_cache();
  std::vector<Ids> results(4);
  std::vector<std::thread> threads;
  for (auto& result : results) {
    threads.emplace_back([&] {
      for (int k = 0; k < 5; ++k) result = tok.encode(text);
    });
  }
  for (auto& thread : threads) thread.join();
  for (const Ids& result : results) CHECK(result == expected);
}

TEST_CASE("tokenizer: encode_batch left-pads") {
  const rlhf::GPT2Tokenizer tok = rlhf::GPT2Tokenizer::byte_level();
  const int64_t a = id_of('a'), b = id_of('b'), pad = tok.eos_id();

  rlhf::BatchEncoding batch = rlhf::encode_batch(tok, {"ab", "a", ""}, pad);
  CHECK(batch.input_ids.sizes() == torch::IntArrayRef({3, 2}));
  CHECK((batch.input_ids.scalar_type() == torch::kLong));
  CHECK((batch.attention_mask.scalar_type() == torch::kLong));
  CHECK(torch::equal(batch.input_ids, torch::tensor({a, b, pad, a, pad, pad}, torch::kLong).view({3, 2})));
  CHECK(torch::equal(batch.attention_mask, torch::tensor({1, 1, 0, 1, 0, 0}, torch::kLong).view({3, 2})));

  // prepend_bos puts eos_id() first; "<|endoftext|>" is one id with allow_special; pad_id 0 is '!'.
  batch = rlhf::encode_batch(tok, {"ab", "<|endoftext|>"}, /*pad_id=*/0, /*allow_special=*/true,
                             /*prepend_bos=*/true);
  CHECK(batch.input_ids.sizes() == torch::IntArrayRef({2, 3}));
  CHECK(torch::equal(batch.input_ids, torch::tensor({pad, a, b, int64_t{0}, pad, pad}, torch::kLong).view({2, 3})));
  CHECK(torch::equal(batch.attention_mask, torch::tensor({1, 1, 1, 0, 1, 1}, torch::kLong).view({2, 3})));
  // Every row ends with its last real token.
  CHECK(torch::all(batch.attention_mask.select(1, -1) == 1).item<bool>());

  CHECK_THROWS_WITH_AS(rlhf::encode_batch(tok, {"", ""}, pad),
                       "encode_batch: all 2 texts encode to no tokens ---> HINT: pass prepend_bos = true to start "
                       "every row with a token",
                       rlhf::Error);
}

TEST_CASE("tokenizer: errors name the file and what is wrong") {
  const TestFiles files;
  const std::string vocab = files.vocab.string();
  const std::string merges = files.merges.string();
  const std::filesystem::path bad = files.dir.path() / "bad.json";
  const std::string bad_name = bad.string();
  const auto load_vocab = [&](const std::string& json) {
    write(bad, json);
    return rlhf::GPT2Tokenizer::from_files(bad, files.merges);
  };
  const auto load_merges = [&](const std::string& text) {
    write(files.dir.path() / "bad.txt", text);
    return rlhf::GPT2Tokenizer::from_files(files.vocab, files.dir.path() / "bad.txt");
  };
  const std::string bad_txt = (files.dir.path() / "bad.txt").string();

  SUBCASE("vocab.json") {
    CHECK_THROWS_WITH_AS(rlhf::GPT2Tokenizer::from_files(files.dir.path() / "missing.json", files.merges),
                         ("tokenizer: " + (files.dir.path() / "missing.json").string() + ": no such file").c_str(),
                         rlhf::Error);
    std::string parse_message;
    try {
      const nlohmann::json parsed = nlohmann::json::parse("{\"a\": 1,");
      FAIL("the JSON should not parse: " << parsed.dump());
    } catch (const nlohmann::json::parse_error& e) {
      parse_message = e.what();
    }
    REQUIRE_FALSE(parse_message.empty());
    CHECK_THROWS_WITH_AS(load_vocab("{\"a\": 1,"), ("tokenizer: " + bad_name + ": invalid JSON: " + parse_message).c_str(),
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(load_vocab("[1, 2]"),
                         ("tokenizer: " + bad_name + ": expected a JSON object of token -> id, got array").c_str(),
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(load_vocab("{\"a\": 1.5}"),
                         ("tokenizer: " + bad_name + ": token 'a' has id 1.5, expected an integer").c_str(), rlhf::Error);
    CHECK_THROWS_WITH_AS(load_vocab("{\"a\": \"1\"}"),
                         ("tokenizer: " + bad_name + ": token 'a' has id \"1\", expected an integer").c_str(),
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(load_vocab("{\"a\": -1}"),
                         ("tokenizer: " + bad_name + ": token 'a' has id -1, expected 0 <= id < 16777216").c_str(),
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(load_vocab("{\"a\": 0, \"b\": 0}"),
                         ("tokenizer: " + bad_name + ": id 0 is used by both 'a' and 'b'").c_str(), rlhf::Error);
    CHECK_THROWS_WITH_AS(load_vocab("{}"), ("tokenizer: " + bad_name + ": the vocab is empty").c_str(), rlhf::Error);
  }
  SUBCASE("merges.txt") {
    CHECK_THROWS_WITH_AS(
        load_merges("#version: 0.2\nĠ t\nabc\n"),
        ("tokenizer: " + bad_txt + ": line 3: expected two space-separated tokens, got 'abc'").c_str(), rlhf::Error);
    CHECK_THROWS_WITH_AS(
        load_merges("Ġ t\n\nh e f\n"),
        ("tokenizer: " + bad_txt + ": line 3: expected two space-separated tokens, got 'h e f'").c_str(),
        rlhf::Error);
    CHECK_THROWS_WITH_AS(load_merges("#version: 0.2\nĠ t\nĠt zz\n"),
                         ("tokenizer: " + bad_txt + ": line 3: merge 'Ġt zz': 'zz' is not in the vocab").c_str(),
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(
        load_merges("#version: 0.2\n\nx y\n"),
        ("tokenizer: " + bad_txt + ": line 3: merge 'x y': the merged token 'xy' is not in the vocab").c_str(),
        rlhf::Error);
    // No version line, CRLF line ends and blank lines are fine.
    CHECK(load_merges("Ġ t\r\n\r\nh e\r\nĠt he\r\n").encode(" the") == Ids{258});
  }
  SUBCASE("tokenizer.json") {
    const auto load_json = [&](const nlohmann::json& json) {
      write(bad, json.dump());
      return rlhf::GPT2Tokenizer::from_tokenizer_json(bad);
    };
    nlohmann::json model = {{"type", "BPE"}, {"vocab", test_vocab_json()}, {"merges", {"Ġ t"}}};
    CHECK(load_json({{"model", model}}).encode(" t") == Ids{256});
    CHECK_THROWS_WITH_AS(load_json({{"version", "1.0"}}),
                         ("tokenizer: " + bad_name + ": expected a 'model' object").c_str(), rlhf::Error);
    nlohmann::json wrong = model;
    wrong["type"] = "WordPiece";
    CHECK_THROWS_WITH_AS(load_json({{"model", wrong}}),
                         ("tokenizer: " + bad_name + ": model.type is \"WordPiece\", expected \"BPE\"").c_str(),
                         rlhf::Error);
    wrong = model;
    wrong["merges"] = {"Ġ t", 5};
    CHECK_THROWS_WITH_AS(
        load_json({{"model", wrong}}),
        ("tokenizer: " + bad_name + ": model.merges[1]: expected \"a b\" or [\"a\", \"b\"], got 5").c_str(),
        rlhf::Error);
    wrong["merges"] = nlohmann::json::array({nlohmann::json::array({"Ġ", "t"}), nlohmann::json::array({"x", "y"})});
    CHECK_THROWS_WITH_AS(
        load_json({{"model", wrong}}),
        ("tokenizer: " + bad_name + ": model.merges[1]: merge 'x y': the merged token 'xy' is not in the vocab")
            .c_str(),
        rlhf::Error);
    wrong = model;
    wrong["vocab"] = {{"a", 0}, {"b", 0}};
    wrong["merges"] = nlohmann::json::array();
    CHECK_THROWS_WITH_AS(load_json({{"model", wrong}}),
                         ("tokenizer: " + bad_name + ": model.vocab: id 0 is used by both 'a' and 'b'").c_str(),
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(
        load_json({{"model", model}, {"added_tokens", {{{"id", 3}, {"content", "<|endoftext|>"}}}}}),
        ("tokenizer: " + bad_name + ": added_tokens[0]: '<|endoftext|>' has id 3, but model.vocab gives it id 277")
            .c_str(),
        rlhf::Error);
  }
  SUBCASE("from_pretrained") {
    rlhf::test::TempDir empty;
    CHECK_THROWS_WITH_AS(rlhf::GPT2Tokenizer::from_pretrained(empty.path()),
                         ("tokenizer: " + empty.path().string() +
                          ": no tokenizer files: looked for tokenizer.json, or vocab.json + merges.txt")
                             .c_str(),
                         rlhf::Error);
    write(empty.path() / "vocab.json", "{}");
    CHECK_THROWS_WITH_AS(rlhf::GPT2Tokenizer::from_pretrained(empty.path()),
                         ("tokenizer: " + empty.path().string() +
                          ": no tokenizer files: looked for tokenizer.json, or vocab.json + merges.txt (merges.txt is "
                          "missing)")
                             .c_str(),
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::GPT2Tokenizer::from_pretrained(empty.path() / "nope"),
                         ("tokenizer: " + (empty.path() / "nope").string() +
                          ": no such directory (looked for tokenizer.json, or vocab.json + merges.txt)")
                             .c_str(),
                         rlhf::Error);
  }
  SUBCASE("ids and bytes") {
    const rlhf::GPT2Tokenizer tok = files.load();
    CHECK_THROWS_WITH_AS(tok.decode(Ids{1, 99999}), "tokenizer: id 99999 is not in the vocab (vocab_size 278)",
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(tok.id_to_token(-1), "tokenizer: id -1 is not in the vocab (vocab_size 278)", rlhf::Error);
    const rlhf::GPT2Tokenizer no_z({{"a", 0}, {"b", 1}}, {});
    CHECK_THROWS_WITH_AS(no_z.encode("abz"), "tokenizer: byte 0x7a has no token in the vocab (expected 'z')",
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::encode_batch(tok, {}, 0), "encode_batch: empty batch (expected at least one text)",
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::encode_batch(tok, {"a"}, 278), "encode_batch: pad_id 278 is outside the vocab [0, 278)",
                         rlhf::Error);
  }
}
