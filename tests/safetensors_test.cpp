#include "test_util.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include <rlhf/io/atomic_file.hpp>
#include <rlhf/io/safetensors.hpp>

namespace {

namespace fs = std::filesystem;

// ---- helpers ----

using rlhf::test::TempDir;

/// `n` as 8 little-endian bytes.
std::string le64(uint64_t n) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return bytes;
}

/// The raw bytes of a float / int, as stored in a little-endian file.
template <class T>
std::string raw(std::initializer_list<T> values) {
  std::string bytes;
  for (const T value : values) bytes.append(reinterpret_cast<const char*>(&value), sizeof(T));
  return bytes;
}

/// Writes `bytes` to `path` as they are.
void write_raw(const fs::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

/// Writes a safetensors file: length prefix = header.size(), then `header`, then `data`.
fs::path write_safetensors_raw(const TempDir& dir, std::string_view header, std::string_view data,
                               std::string_view name = "test.safetensors") {
  const fs::path path = dir / name;
  write_raw(path, le64(header.size()) + std::string(header) + std::string(data));
  return path;
}

/// The message rlhf::SafetensorsFile gives for `path` with the given suffix.
std::string open_message(const fs::path& path, std::string_view suffix) {
  return "safetensors: " + path.string() + ": " + std::string(suffix);
}

/// What nlohmann::json says about `text`.
std::string json_error(std::string_view text) {
  try {
    const nlohmann::json parsed = nlohmann::json::parse(text);
    return "<parsed: " + parsed.dump() + ">";
  } catch (const nlohmann::json::parse_error& e) {
    return e.what();
  }
}

/// Names of the entries of `dir`, sorted.
std::vector<std::string> list_dir(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

/// The address range [begin, end) of this process's mappings of `file` (from /proc/self/maps), if any.
std::optional<std::pair<std::uintptr_t, std::uintptr_t>> mapped_range(const fs::path& file) {
  const std::string target = fs::canonical(file).string();
  std::ifstream maps("/proc/self/maps");
  std::optional<std::pair<std::uintptr_t, std::uintptr_t>> range;
  for (std::string line; std::getline(maps, line);) {
    if (line.size() < target.size() || line.compare(line.size() - target.size(), target.size(), target) != 0) continue;
    const auto dash = line.find('-');
    const auto space = line.find(' ');
    const auto begin = static_cast<std::uintptr_t>(std::stoull(line.substr(0, dash), nullptr, 16));
    const auto end = static_cast<std::uintptr_t>(std::stoull(line.substr(dash + 1, space - dash - 1), nullptr, 16));
    range = range ? std::pair{std::min(range->first, begin), std::max(range->second, end)} : std::pair{begin, end};
  }
  return range;
}

/// "Float", "BFloat16", ...: dtypes compared by name, so that a failing check prints them.
std::string dtype_name(torch::ScalarType dtype) { return c10::toString(dtype); }
std::string dtype_name(const torch::Tensor& tensor) { return dtype_name(tensor.scalar_type()); }

bool inside(const torch::Tensor& tensor, const std::pair<std::uintptr_t, std::uintptr_t>& range) {
  const auto address = reinterpret_cast<std::uintptr_t>(tensor.data_ptr());
  return address >= range.first && address < range.second;
}

/// A header of one tensor entry, as the reference writer formats it.
std::string entry(std::string_view name, std::string_view dtype, std::string_view shape, uint64_t begin, uint64_t end) {
  return fmt::format(R"("{}":{{"dtype":"{}","shape":{},"data_offsets":[{},{}]}})", name, dtype, shape, begin, end);
}

}  // namespace

// Checks that opening `path` throws rlhf::Error with exactly "safetensors: {path}: {suffix}".
#define CHECK_OPEN_FAILS(path, suffix) \
  CHECK_THROWS_WITH_AS(rlhf::SafetensorsFile{path}, open_message(path, suffix).c_str(), rlhf::Error)

TEST_CASE("safetensors: SafetensorsFile is movable, not copyable") {
  static_assert(std::is_nothrow_move_constructible_v<rlhf::SafetensorsFile>);
  static_assert(std::is_nothrow_move_assignable_v<rlhf::SafetensorsFile>);
  static_assert(!std::is_copy_constructible_v<rlhf::SafetensorsFile>);
  static_assert(!std::is_copy_assignable_v<rlhf::SafetensorsFile>);

  TempDir dir;
  const auto path = write_safetensors_raw(dir, "{" + entry("a", "F32", "[2]", 0, 8) + "}", raw({1.0f, 2.0f}));
  rlhf::SafetensorsFile file(path);
  rlhf::SafetensorsFile moved(std::move(file));
  CHECK(moved.path() == path);
  REQUIRE(moved.find("a") != nullptr);
  CHECK(torch::equal(moved.view("a"), torch::tensor({1.0f, 2.0f})));
}

TEST_CASE("safetensors: opening rejects unreadable and truncated files with exact messages") {
  TempDir dir;

  SUBCASE("missing file") {
    const fs::path path = dir / "missing.safetensors";
    CHECK_OPEN_FAILS(path, fmt::format("cannot open: {}", std::strerror(ENOENT)));
  }
  SUBCASE("a directory") { CHECK_OPEN_FAILS(dir.path(), fmt::format("cannot open: {}", std::strerror(EISDIR))); }
  SUBCASE("empty file") {
    const fs::path path = dir / "empty.safetensors";
    write_raw(path, "");
    CHECK_OPEN_FAILS(path, "file is 0 bytes, too short for the 8-byte header length (truncated?)");
  }
  SUBCASE("five bytes") {
    const fs::path path = dir / "short.safetensors";
    write_raw(path, std::string("\x02\0\0\0\0", 5));
    CHECK_OPEN_FAILS(path, "file is 5 bytes, too short for the 8-byte header length (truncated?)");
  }
  SUBCASE("header length beyond the file") {
    const fs::path path = dir / "cut.safetensors";
    write_raw(path, le64(100) + "{}");
    CHECK_OPEN_FAILS(path, "header length 100 exceeds the 2 bytes after the length prefix (truncated file?)");
  }
  SUBCASE("header length near 2^64 does not wrap") {
    const fs::path path = dir / "huge.safetensors";
    write_raw(path, le64(UINT64_MAX - 3) + "{}");
    CHECK_OPEN_FAILS(path,
                     "header length 18446744073709551612 exceeds the 2 bytes after the length prefix "
                     "(truncated file?)");
  }
  SUBCASE("header over the 100 MB limit of the format") {
    const fs::path path = dir / "bloated.safetensors";
    write_raw(path, le64(100'000'008));
    fs::resize_file(path, 8 + 100'000'008);  // sparse: costs no disk
    CHECK_OPEN_FAILS(path, "header length 100000008 exceeds the format's limit of 100000000 bytes");
  }
}

TEST_CASE("safetensors: opening rejects malformed headers with exact messages") {
  TempDir dir;
  const std::string f32 = R"("dtype":"F32")";

  SUBCASE("not JSON") {
    const std::string header = R"({"a":{"dtype":)";
    const auto path = write_safetensors_raw(dir, header, "");
    CHECK_OPEN_FAILS(path, "header is not valid JSON: " + json_error(header));
  }
  SUBCASE("not UTF-8") {
    const std::string header = "{\"\xff\":{}}";
    const auto path = write_safetensors_raw(dir, header, "");
    CHECK_OPEN_FAILS(path, "header is not valid JSON: " + json_error(header));
  }
  SUBCASE("JSON but not an object") {
    const auto path = write_safetensors_raw(dir, "[1, 2]", "");
    CHECK_OPEN_FAILS(path, "header is not a JSON object");
  }
  SUBCASE("entry not an object") {
    const auto path = write_safetensors_raw(dir, R"({"a":5})", "");
    CHECK_OPEN_FAILS(path, "tensor 'a': entry must be an object with fields 'dtype', 'shape' and 'data_offsets'");
  }
  SUBCASE("dtype missing or not a string") {
    for (const std::string header :
         {R"({"w":{"shape":[1],"data_offsets":[0,4]}})", R"({"w":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})"}) {
      CAPTURE(header);
      const auto path = write_safetensors_raw(dir, header, std::string(4, '\0'));
      CHECK_OPEN_FAILS(path, "tensor 'w': field 'dtype' must be a string");
    }
  }
  SUBCASE("shape missing or mistyped") {
    for (const std::string shape :
         {R"("shape":"2",)", R"("shape":[-1],)", R"("shape":[1.5],)", R"("shape":[[1]],)", R"("shape":null,)", ""}) {
      CAPTURE(shape);
      const auto path =
          write_safetensors_raw(dir, R"({"w":{"dtype":"F32",)" + shape + R"("data_offsets":[0,4]}})", raw({0.0f}));
      CHECK_OPEN_FAILS(path, "tensor 'w': field 'shape' must be an array of non-negative integers");
    }
  }
  SUBCASE("data_offsets missing or mistyped") {
    for (const std::string offsets :
         {R"(,"data_offsets":[0])", R"(,"data_offsets":[0,-4])", R"(,"data_offsets":[0,4,8])",
          R"(,"data_offsets":"0,4")", R"(,"data_offsets":[0,4.0])", ""}) {
      CAPTURE(offsets);
      const auto path = write_safetensors_raw(dir, "{\"w\":{" + f32 + R"(,"shape":[1])" + offsets + "}}", raw({0.0f}));
      CHECK_OPEN_FAILS(path, "tensor 'w': field 'data_offsets' must be an array of two non-negative integers");
    }
  }
  SUBCASE("unexpected field") {
    const auto path = write_safetensors_raw(
        dir, "{\"w\":{" + f32 + R"(,"shape":[1],"data_offsets":[0,4],"offsets":[0,4]}})", raw({0.0f}));
    CHECK_OPEN_FAILS(path, "tensor 'w': unexpected field 'offsets'");
  }
  SUBCASE("unsupported dtypes") {
    for (const std::string dtype : {"F8_E4M3", "U16", "XYZ", "f32", ""}) {
      CAPTURE(dtype);
      const auto path = write_safetensors_raw(dir, "{" + entry("w", dtype, "[1]", 0, 1) + "}", std::string(1, '\0'));
      CHECK_OPEN_FAILS(path, fmt::format("tensor 'w': unsupported dtype '{}' (supported: F32, F16, BF16, F64, I64, "
                                         "I32, I16, I8, U8, BOOL)",
                                         dtype));
    }
  }
  SUBCASE("reversed offsets") {
    const auto path = write_safetensors_raw(dir, "{" + entry("w", "F32", "[1]", 8, 4) + "}", std::string(8, '\0'));
    CHECK_OPEN_FAILS(path, "tensor 'w': data_offsets [8, 4] are reversed");
  }
  SUBCASE("offsets past the data section") {
    const auto path = write_safetensors_raw(dir, "{" + entry("w", "F32", "[2]", 0, 8) + "}", raw({1.0f}));
    CHECK_OPEN_FAILS(path, "tensor 'w': data_offsets [0, 8] run past the data section of 4 bytes (truncated file?)");
  }
  SUBCASE("shape and dtype disagree with the byte span") {
    const auto path = write_safetensors_raw(dir, "{" + entry("w", "F32", "[2,3]", 0, 20) + "}", std::string(20, '\0'));
    CHECK_OPEN_FAILS(path, "tensor 'w': shape [2, 3] x F32 (4 bytes) needs 24 bytes, data_offsets span 20");
  }
  SUBCASE("0-d tensor needs one element") {
    const auto path = write_safetensors_raw(dir, "{" + entry("s", "BF16", "[]", 0, 0) + "}", "");
    CHECK_OPEN_FAILS(path, "tensor 's': shape [] x BF16 (2 bytes) needs 2 bytes, data_offsets span 0");
  }
  SUBCASE("absurd shapes are refused, not wrapped") {
    const std::vector<std::pair<std::string, std::string>> cases = {
        {"[4294967296,4294967296]", "[4294967296, 4294967296]"},       // 2^64 elements: wraps to 0
        {"[4611686018427387904]", "[4611686018427387904]"},            // 2^62 x 4 bytes = 2^64: wraps to 0
        {"[18446744073709551615]", "[18446744073709551615]"},          // beyond int64
        {"[0,4294967296,4294967296]", "[0, 4294967296, 4294967296]"},  // no elements, but strides overflow
    };
    for (const auto& [shape, printed] : cases) {
      CAPTURE(shape);
      const auto path = write_safetensors_raw(dir, "{" + entry("w", "F32", shape, 0, 0) + "}", "");
      CHECK_OPEN_FAILS(
          path, fmt::format("tensor 'w': shape {} x F32 (4 bytes) is too large (its sizes overflow 64 bits)", printed));
    }
  }
  SUBCASE("overlapping tensors") {
    const auto path = write_safetensors_raw(
        dir, "{" + entry("b", "F32", "[2]", 4, 12) + "," + entry("a", "F32", "[2]", 0, 8) + "}", std::string(12, '\0'));
    CHECK_OPEN_FAILS(path, "tensors 'a' and 'b' overlap (bytes [0, 8) and [4, 12))");
  }
  SUBCASE("empty tensor inside another") {
    const auto path = write_safetensors_raw(
        dir, "{" + entry("a", "F32", "[2]", 0, 8) + "," + entry("e", "F32", "[0]", 4, 4) + "}", std::string(8, '\0'));
    CHECK_OPEN_FAILS(path, "tensors 'a' and 'e' overlap (bytes [0, 8) and [4, 4))");
  }
  SUBCASE("gap between tensors") {
    const auto path = write_safetensors_raw(
        dir, "{" + entry("a", "F32", "[1]", 0, 4) + "," + entry("b", "F32", "[1]", 8, 12) + "}", std::string(12, '\0'));
    CHECK_OPEN_FAILS(path, "gap of 4 bytes between tensor 'a' and 'b'");
  }
  SUBCASE("gap before the first tensor") {
    const auto path = write_safetensors_raw(dir, "{" + entry("a", "F32", "[1]", 4, 8) + "}", std::string(8, '\0'));
    CHECK_OPEN_FAILS(path, "gap of 4 bytes before the first tensor 'a'");
  }
  SUBCASE("bytes after the last tensor") {
    const auto path = write_safetensors_raw(
        dir, "{" + entry("z", "F32", "[1]", 0, 4) + "," + entry("a", "U8", "[2]", 4, 6) + "}", std::string(9, '\0'));
    CHECK_OPEN_FAILS(path, "3 unexpected bytes after the last tensor 'a'");
  }
  SUBCASE("data but no tensors") {
    const auto path = write_safetensors_raw(dir, R"({"__metadata__":{}})", std::string(4, '\0'));
    CHECK_OPEN_FAILS(path, "4 unexpected bytes in the data section of a file with no tensors");
  }
  SUBCASE("__metadata__ not an object of strings") {
    for (const std::string metadata : {R"({"k":1})", R"({"k":"v","n":null})", R"("text")", "null", "[]"}) {
      CAPTURE(metadata);
      const auto path = write_safetensors_raw(dir, R"({"__metadata__":)" + metadata + "}", "");
      CHECK_OPEN_FAILS(path, "__metadata__ must be an object of string values");
    }
  }
}

TEST_CASE("safetensors: lookups and data checks that happen after opening") {
  TempDir dir;
  const auto path =
      write_safetensors_raw(dir, "{" + entry("m", "BOOL", "[3]", 0, 3) + "," + entry("w", "F32", "[1]", 3, 7) + "}",
                            std::string("\x01\x00\x02", 3) + raw({5.0f}));
  const rlhf::SafetensorsFile file(path);
  CHECK(file.find("nope") == nullptr);
  CHECK_THROWS_WITH_AS(file.info("nope"), open_message(path, "no tensor named 'nope'").c_str(), rlhf::Error);
  CHECK_THROWS_WITH_AS(file.view("nope"), open_message(path, "no tensor named 'nope'").c_str(), rlhf::Error);
  CHECK_THROWS_WITH_AS(file.load("m"),
                       open_message(path, "tensor 'm': BOOL element 2 holds byte 2 (expected 0 or 1)").c_str(),
                       rlhf::Error);
  CHECK(file.load("w").item<float>() == 5.0f);
}

TEST_CASE("safetensors: valid files the reference writer or other tools produce") {
  TempDir dir;

  SUBCASE("no tensors at all") {
    const auto path = write_safetensors_raw(dir, "{}      ", "");
    const rlhf::SafetensorsFile file(path);
    CHECK(file.tensors().empty());
    CHECK(file.metadata().empty());
    CHECK(rlhf::load_safetensors(path).empty());
  }
  SUBCASE("header entries in any order, sorted by offset; empty tensors at shared offsets") {
    const std::string header = "{" + entry("z", "F32", "[1]", 0, 4) + "," + entry("e1", "F32", "[0,5]", 4, 4) + "," +
                               entry("e2", "I64", "[0]", 4, 4) + "," + entry("a", "I16", "[2]", 4, 8) +
                               R"(,"__metadata__":{"format":"pt"}})";
    const auto path = write_safetensors_raw(dir, header, raw({1.5f}) + raw<int16_t>({-3, 7}));
    const rlhf::SafetensorsFile file(path);
    std::vector<std::string> order;
    for (const auto& info : file.tensors()) order.push_back(info.name);
    CHECK(order == std::vector<std::string>{"z", "e1", "e2", "a"});
    CHECK(file.metadata() == std::map<std::string, std::string>{{"format", "pt"}});
    const rlhf::TensorInfo& a = file.info("a");
    CHECK(dtype_name(a.dtype) == dtype_name(torch::kInt16));
    CHECK(a.dtype_name == "I16");
    CHECK(a.shape == std::vector<int64_t>{2});
    CHECK(a.begin == 4);
    CHECK(a.end == 8);
    CHECK(torch::equal(file.load("a"), torch::tensor({-3, 7}, torch::kInt16)));
    CHECK(file.load("e1").sizes() == torch::IntArrayRef{0, 5});
    CHECK(dtype_name(file.view("e2")) == dtype_name(torch::kInt64));
  }
}

TEST_CASE("safetensors: round trip of every supported dtype, 0-d, empty and strided tensors") {
  TempDir dir;
  torch::manual_seed(7);
  const std::map<std::string, torch::Tensor> tensors = {
      {"f32", torch::randn({3, 4})},
      {"f16", torch::randn({5}).to(torch::kFloat16)},
      {"bf16", torch::randn({2, 3}).to(torch::kBFloat16)},
      {"f64", torch::randn({2, 2}, torch::kFloat64)},
      {"i64", torch::arange(-3, 3, torch::kInt64)},
      {"i32", torch::tensor({-2147483647 - 1, 0, 2147483647}, torch::kInt32)},
      {"i16", torch::tensor({-32768, 1, 32767}, torch::kInt16)},
      {"i8", torch::tensor({-128, 0, 127}, torch::kInt8)},
      {"u8", torch::tensor({0, 128, 255}, torch::kUInt8)},
      {"bool", torch::tensor({true, false, true})},
      {"scalar", torch::scalar_tensor(3.5)},
      {"scalar_i64", torch::scalar_tensor(-9, torch::kInt64)},
      {"empty", torch::empty({0, 3})},
      {"empty_bf16", torch::empty({2, 0}, torch::kBFloat16)},
      {"transposed", torch::randn({4, 3}).t()},
      {"sliced", torch::arange(10, torch::kFloat32).slice(0, 2, 9, 3)},
      {"grad", torch::ones({2}, torch::requires_grad())},
  };
  const fs::path path = dir / "all.safetensors";
  rlhf::save_safetensors(path, tensors);

  const auto loaded = rlhf::load_safetensors(path);
  REQUIRE(loaded.size() == tensors.size());
  for (const auto& [name, expected] : tensors) {
    CAPTURE(name);
    REQUIRE(loaded.count(name) == 1);
    const torch::Tensor& actual = loaded.at(name);
    CHECK(dtype_name(actual) == dtype_name(expected.scalar_type()));
    CHECK(actual.sizes() == expected.sizes());
    CHECK(actual.is_contiguous());
    CHECK(torch::equal(actual, expected.detach()));
    CHECK_FALSE(actual.requires_grad());
  }

  const rlhf::SafetensorsFile file(path);
  CHECK(file.info("scalar").shape.empty());
  CHECK(file.info("scalar").end - file.info("scalar").begin == 4);
  CHECK(file.info("bf16").dtype_name == "BF16");
  CHECK(file.info("bool").dtype_name == "BOOL");
  CHECK(file.info("u8").dtype_name == "U8");
  for (std::size_t i = 1; i < file.tensors().size(); ++i) {
    CHECK(file.tensors()[i - 1].end == file.tensors()[i].begin);
  }
  // Data are ordered by element size (largest first), then by name, as the reference writer orders them, so every
  // tensor's offset is a multiple of its element size.
  for (std::size_t i = 1; i < file.tensors().size(); ++i) {
    const auto& a = file.tensors()[i - 1];
    const auto& b = file.tensors()[i];
    const auto size_a = c10::elementSize(a.dtype), size_b = c10::elementSize(b.dtype);
    CHECK((size_a > size_b || (size_a == size_b && a.name < b.name)));
  }
  for (const auto& info : file.tensors()) CHECK(info.begin % c10::elementSize(info.dtype) == 0);
  CHECK(file.view("scalar").dim() == 0);
  CHECK(file.view("scalar").item<float>() == 3.5f);
}

TEST_CASE("safetensors: metadata round trip") {
  TempDir dir;
  const fs::path path = dir / "meta.safetensors";
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"},
      {"quote\"and\\backslash", "line\nbreak\ttab\x01"},
      {"unicode", "h\xc3\xa9llo \xe2\x9c\x93"},
      {"", ""},
  };
  rlhf::save_safetensors(path, {{"w", torch::ones({2})}}, metadata);
  CHECK(rlhf::SafetensorsFile(path).metadata() == metadata);

  SUBCASE("no metadata: no __metadata__ key") {
    rlhf::save_safetensors(path, {{"w", torch::ones({2})}});
    CHECK(rlhf::SafetensorsFile(path).metadata().empty());
    CHECK(rlhf::read_file(path).find("__metadata__") == std::string::npos);
  }
  SUBCASE("metadata alone") {
    rlhf::save_safetensors(path, {}, {{"k", "v"}});
    const rlhf::SafetensorsFile file(path);
    CHECK(file.tensors().empty());
    CHECK(file.metadata().at("k") == "v");
  }
  SUBCASE("invalid UTF-8 is refused before anything is written") {
    const std::string before = rlhf::read_file(path);
    CHECK_THROWS_WITH_AS(rlhf::save_safetensors(path, {{"w", torch::ones({2})}}, {{"k", "\xff"}}),
                         doctest::Contains("tensor names and metadata must be valid UTF-8"), rlhf::Error);
    CHECK(rlhf::read_file(path) == before);
    CHECK(list_dir(dir.path()) == std::vector<std::string>{"meta.safetensors"});
  }
}

TEST_CASE("safetensors: load converts dtype and device") {
  TempDir dir;
  torch::manual_seed(11);
  const torch::Tensor x = torch::randn({64}) * 100;  // [64]
  const float f16_values[] = {0.5f, -2.0f, 1024.0f, 65504.0f, 6.103515625e-05f, 3.140625f, -0.0f, 0.0f};
  const torch::Tensor h = torch::from_blob(const_cast<float*>(f16_values), {8}).to(torch::kFloat16);
  const fs::path path = dir / "convert.safetensors";
  rlhf::save_safetensors(path, {{"x", x}, {"h", h}});
  const rlhf::SafetensorsFile file(path);

  SUBCASE("F32 -> BF16 within bf16 rounding, and back exactly") {
    const torch::Tensor b = file.load("x", torch::kBFloat16);
    CHECK(dtype_name(b) == dtype_name(torch::kBFloat16));
    const torch::Tensor relative = ((b.to(torch::kFloat32) - x).abs() / x.abs()).max();
    CHECK(relative.item<float>() <= 1.0f / 256);  // bf16 keeps 8 significant bits
    const fs::path bf16_path = dir / "bf16.safetensors";
    rlhf::save_safetensors(bf16_path, {{"x", b}});
    const torch::Tensor back = rlhf::SafetensorsFile(bf16_path).load("x", torch::kFloat32);
    CHECK(dtype_name(back) == dtype_name(torch::kFloat32));
    CHECK(torch::equal(back, b.to(torch::kFloat32)));
  }
  SUBCASE("F16 -> F32 is exact for representable values") {
    const torch::Tensor f = file.load("h", torch::TensorOptions().dtype(torch::kFloat32));
    CHECK(dtype_name(f) == dtype_name(torch::kFloat32));
    for (int i = 0; i < 8; ++i) CHECK(f[i].item<float>() == f16_values[i]);
    CHECK(std::signbit(f[6].item<float>()));
  }
  SUBCASE("load_safetensors converts every tensor") {
    const auto all = rlhf::load_safetensors(path, torch::kFloat64);
    CHECK(dtype_name(all.at("x")) == dtype_name(torch::kFloat64));
    CHECK(dtype_name(all.at("h")) == dtype_name(torch::kFloat64));
    CHECK(torch::equal(all.at("x"), x.to(torch::kFloat64)));
  }
  SUBCASE("requires_grad and layout options") {
    CHECK(file.load("x", torch::requires_grad()).requires_grad());
    CHECK_THROWS_WITH_AS(
        file.load("x", torch::TensorOptions().layout(torch::kSparse)),
        open_message(path, "tensor 'x': cannot load into layout Sparse (only strided tensors)").c_str(), rlhf::Error);
  }
  SUBCASE("load gives a fresh tensor") {
    const torch::Tensor loaded = file.load("x");
    const torch::Tensor view = file.view("x");
    CHECK(loaded.data_ptr() != view.data_ptr());
    loaded.fill_(0);
    CHECK(torch::equal(view, x));
  }
  if (torch::cuda::is_available()) {
    SUBCASE("CUDA: load to the device, save from the device") {
      const torch::Tensor on_gpu = file.load("x", torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16));
      CHECK(on_gpu.is_cuda());
      CHECK(dtype_name(on_gpu) == dtype_name(torch::kBFloat16));
      CHECK(torch::equal(on_gpu.cpu(), x.to(torch::kBFloat16)));
      const fs::path gpu_path = dir / "gpu.safetensors";
      rlhf::save_safetensors(gpu_path, {{"g", on_gpu.t()}, {"x", x.cuda()}});
      const auto back = rlhf::load_safetensors(gpu_path, torch::Device(torch::kCUDA));
      CHECK(back.at("x").is_cuda());
      CHECK(torch::equal(back.at("x").cpu(), x));
    }
  }
}

TEST_CASE("safetensors: view aliases the mapping and copies unaligned data") {
  TempDir dir;

  SUBCASE("aligned: zero copy, keeps the mapping alive") {
    const fs::path path = dir / "aligned.safetensors";
    const torch::Tensor w = torch::arange(12, torch::kFloat32).reshape({3, 4});  // [3, 4]
    rlhf::save_safetensors(path, {{"b", torch::tensor({7}, torch::kInt64)}, {"w", w}});
    torch::Tensor view;
    {
      const rlhf::SafetensorsFile file(path);
      const auto range = mapped_range(path);
      REQUIRE(range.has_value());
      view = file.view("w");
      const torch::Tensor b = file.view("b");
      CHECK(inside(view, *range));
      CHECK(inside(b, *range));
      CHECK(static_cast<const char*>(view.data_ptr()) - static_cast<const char*>(b.data_ptr()) ==
            static_cast<std::ptrdiff_t>(file.info("w").begin - file.info("b").begin));
      CHECK(file.view("w").data_ptr() == view.data_ptr());
      CHECK_FALSE(inside(file.load("w"), *range));
    }
    // The file object is gone; the view still holds the mapping.
    REQUIRE(mapped_range(path).has_value());
    CHECK(torch::equal(view, w));
    view = torch::Tensor();
    CHECK_FALSE(mapped_range(path).has_value());
  }

  SUBCASE("unaligned offsets: an aligned copy with the right values") {
    std::string header = "{" + entry("a", "U8", "[1]", 0, 1) + "," + entry("b", "F32", "[2]", 1, 9) + "," +
                         entry("c", "F64", "[1]", 9, 17) + "," + entry("d", "I16", "[2]", 17, 21) + "}";
    header.append((8 - header.size() % 8) % 8, ' ');
    const auto path = write_safetensors_raw(
        dir, header, std::string(1, '\x07') + raw({1.0f, -2.5f}) + raw({0.125}) + raw<int16_t>({-300, 300}));
    const rlhf::SafetensorsFile file(path);
    const auto range = mapped_range(path);
    REQUIRE(range.has_value());

    const torch::Tensor b = file.view("b");
    CHECK(reinterpret_cast<std::uintptr_t>(b.data_ptr()) % 4 == 0);
    CHECK_FALSE(inside(b, *range));
    CHECK(torch::equal(b, torch::tensor({1.0f, -2.5f})));
    const torch::Tensor c = file.view("c");
    CHECK(reinterpret_cast<std::uintptr_t>(c.data_ptr()) % 8 == 0);
    CHECK(c.item<double>() == 0.125);
    const torch::Tensor d = file.view("d");  // the data section starts 8-aligned, so offset 17 is odd
    CHECK(reinterpret_cast<std::uintptr_t>(d.data_ptr()) % 2 == 0);
    CHECK(torch::equal(d, torch::tensor({-300, 300}, torch::kInt16)));
    CHECK(inside(file.view("a"), *range));  // one-byte elements are always aligned
    CHECK(file.view("a").item<uint8_t>() == 7);
    CHECK(torch::equal(file.load("b", torch::kFloat64), torch::tensor({1.0, -2.5}, torch::kFloat64)));
  }
}

TEST_CASE("safetensors: written files have the byte layout of the format") {
  TempDir dir;

  SUBCASE("byte-exact with the reference writer: one F32 tensor") {
    // safetensors.torch.save_file({"a": torch.tensor([1.0, 2.0])}, path): header of 54 bytes + 2 spaces.
    const std::string reference = std::string("\x38\x00\x00\x00\x00\x00\x00\x00", 8) +
                                  R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})" + "  " +
                                  std::string("\x00\x00\x80\x3f\x00\x00\x00\x40", 8);
    REQUIRE(reference.size() == 72);
    const fs::path path = dir / "ours.safetensors";
    rlhf::save_safetensors(path, {{"a", torch::tensor({1.0f, 2.0f})}});
    CHECK(rlhf::read_file(path) == reference);

    const fs::path theirs = dir / "theirs.safetensors";
    write_raw(theirs, reference);
    const auto loaded = rlhf::load_safetensors(theirs);
    CHECK(torch::equal(loaded.at("a"), torch::tensor({1.0f, 2.0f})));
  }
  SUBCASE("byte-exact with the reference writer: metadata comes first") {
    // save_file({"a": torch.tensor([1.0, 2.0])}, path, metadata={"format": "pt"}): 85 bytes + 3 spaces.
    const std::string reference =
        std::string("\x58\x00\x00\x00\x00\x00\x00\x00", 8) +
        R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})" + "   " +
        std::string("\x00\x00\x80\x3f\x00\x00\x00\x40", 8);
    const fs::path path = dir / "meta.safetensors";
    rlhf::save_safetensors(path, {{"a", torch::tensor({1.0f, 2.0f})}}, {{"format", "pt"}});
    CHECK(rlhf::read_file(path) == reference);
  }
  SUBCASE("length prefix, padding and offsets of several tensors") {
    const fs::path path = dir / "layout.safetensors";
    rlhf::save_safetensors(path,
                           {{"b", torch::tensor({7}, torch::kInt64)},
                            {"a", torch::tensor({1.0f, 2.0f, 3.0f}).to(torch::kFloat16)},
                            {"s", torch::scalar_tensor(1.5f)},
                            {"e", torch::empty({0, 2})}},
                           {{"k", "v"}});
    const std::string bytes = rlhf::read_file(path);
    std::string header =
        "{"
        R"("__metadata__":{"k":"v"},)" +
        entry("b", "I64", "[1]", 0, 8) + "," + entry("e", "F32", "[0,2]", 8, 8) + "," +
        entry("s", "F32", "[]", 8, 12) + "," + entry("a", "F16", "[3]", 12, 18) + "}";
    const std::size_t unpadded = header.size();
    header.append((8 - unpadded % 8) % 8, ' ');
    REQUIRE(header.size() % 8 == 0);
    CHECK(header.size() - unpadded < 8);
    // Larger elements first (I64, then F32 by name, then F16), as the reference writer orders them.
    const std::string data = raw<int64_t>({7}) + raw({1.5f}) + std::string("\x00\x3c\x00\x40\x00\x42", 6);
    CHECK(bytes.substr(0, 8) == le64(header.size()));
    CHECK(bytes.substr(8, header.size()) == header);
    CHECK(bytes.substr(8 + header.size()) == data);
    CHECK(bytes.size() == 8 + header.size() + 18);
  }
}

TEST_CASE("safetensors: save refuses what the format cannot hold, before touching the file") {
  TempDir dir;
  const fs::path path = dir / "keep.safetensors";
  rlhf::save_safetensors(path, {{"old", torch::ones({1})}});
  const std::string before = rlhf::read_file(path);

  CHECK_THROWS_WITH_AS(rlhf::save_safetensors(path, {{"c", torch::zeros({2}, torch::kComplexFloat)}}),
                       open_message(path,
                                    "tensor 'c': dtype ComplexFloat has no safetensors equivalent (supported: "
                                    "F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL)")
                           .c_str(),
                       rlhf::Error);
  CHECK_THROWS_WITH_AS(
      rlhf::save_safetensors(path, {{"__metadata__", torch::ones({1})}}),
      open_message(path, "'__metadata__' is reserved for the metadata and cannot name a tensor").c_str(), rlhf::Error);
  CHECK_THROWS_WITH_AS(rlhf::save_safetensors(path, {{"u", torch::Tensor()}}),
                       open_message(path, "tensor 'u' is undefined").c_str(), rlhf::Error);
  CHECK_THROWS_WITH_AS(
      rlhf::save_safetensors(path, {{"s", torch::eye(2).to_sparse()}}),
      open_message(path, "tensor 's' has layout Sparse; only strided (dense) tensors can be saved").c_str(),
      rlhf::Error);
  CHECK(rlhf::read_file(path) == before);
  CHECK(list_dir(dir.path()) == std::vector<std::string>{"keep.safetensors"});
}

TEST_CASE("safetensors: atomic writes leave no temporary file and never clobber on failure") {
  TempDir dir;
  const fs::path path = dir / "out.bin";

  SUBCASE("create and replace") {
    rlhf::write_file_atomic(path, "first");
    CHECK(rlhf::read_file(path) == "first");
    rlhf::write_file_atomic(path, std::string("sec\0nd", 6));
    CHECK(rlhf::read_file(path) == std::string("sec\0nd", 6));
    rlhf::write_file_atomic(path, "");
    CHECK(rlhf::read_file(path).empty());
    CHECK(list_dir(dir.path()) == std::vector<std::string>{"out.bin"});
  }
  SUBCASE("a relative path writes into the working directory's file") {
    const fs::path previous = fs::current_path();
    fs::current_path(dir.path());
    rlhf::write_file_atomic("relative.bin", "here");
    fs::current_path(previous);
    CHECK(rlhf::read_file(dir / "relative.bin") == "here");
  }
  SUBCASE("the writer throws: old file kept, temporary removed") {
    rlhf::write_file_atomic(path, "old");
    const auto throwing = [](std::FILE* file) {
      std::fputs("partial new contents", file);
      throw std::runtime_error("writer gave up");
    };
    CHECK_THROWS_WITH_AS(rlhf::write_file_atomic_with(path, throwing), "writer gave up", std::runtime_error);
    CHECK(rlhf::read_file(path) == "old");
    CHECK(list_dir(dir.path()) == std::vector<std::string>{"out.bin"});
  }
  SUBCASE("the writer sees the temporary file, next to the target") {
    rlhf::write_file_atomic_with(path, [&](std::FILE* file) {
      std::fputs("streamed", file);
      const auto names = list_dir(dir.path());
      REQUIRE(names.size() == 1);
      CHECK(names[0].rfind(".out.bin.tmp.", 0) == 0);
    });
    CHECK(rlhf::read_file(path) == "streamed");
    CHECK(list_dir(dir.path()) == std::vector<std::string>{"out.bin"});
  }
  SUBCASE("a missing directory throws and creates nothing") {
    const fs::path missing = dir / "no" / "such" / "dir" / "file.safetensors";
    CHECK_THROWS_WITH_AS(rlhf::write_file_atomic(missing, "x"),
                         fmt::format("write_file_atomic: {}: cannot create a temporary file in '{}': {}",
                                     missing.string(), missing.parent_path().string(), std::strerror(ENOENT))
                             .c_str(),
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::save_safetensors(missing, {{"w", torch::ones({2})}}),
                         doctest::Contains("cannot create a temporary file"), rlhf::Error);
    CHECK(list_dir(dir.path()).empty());
  }
  SUBCASE("the directory disappears mid-write: an error, nothing left behind") {
    const fs::path sub = dir / "sub";
    fs::create_directory(sub);
    const fs::path target = sub / "model.safetensors";
    const auto remove_directory = [&](std::FILE* file) {
      std::fputs("data", file);
      fs::remove_all(sub);
    };
    CHECK_THROWS_WITH_AS(rlhf::write_file_atomic_with(target, remove_directory), doctest::Contains("cannot rename"),
                         rlhf::Error);
    CHECK_FALSE(fs::exists(sub));
    CHECK(list_dir(dir.path()).empty());
  }
  SUBCASE("not a file path") {
    CHECK_THROWS_WITH_AS(rlhf::write_file_atomic(dir.path() / "", "x"),
                         fmt::format("write_file_atomic: {}: not a path to a file", (dir.path() / "").string()).c_str(),
                         rlhf::Error);
  }
  SUBCASE("read_file errors") {
    const fs::path missing = dir / "missing.txt";
    CHECK_THROWS_WITH_AS(rlhf::read_file(missing),
                         fmt::format("read_file: {}: cannot open: {}", missing.string(), std::strerror(ENOENT)).c_str(),
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(
        rlhf::read_file(dir.path()),
        fmt::format("read_file: {}: read failed: {}", dir.path().string(), std::strerror(EISDIR)).c_str(), rlhf::Error);
  }
  SUBCASE("new files get the usual permissions (0666 less the umask), not mkstemp's 0600") {
    const mode_t mask = ::umask(0);
    ::umask(mask);
    rlhf::write_file_atomic(path, "x");
    struct stat info {};
    REQUIRE(::stat(path.c_str(), &info) == 0);
    CHECK((info.st_mode & 0777) == (0666 & ~mask));
  }
}
