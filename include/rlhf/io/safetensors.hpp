#pragma once
/// @file Reading and writing safetensors files (https://github.com/huggingface/safetensors).
///
/// Layout: 8 bytes little-endian uint64 N, then N bytes of UTF-8 JSON
///   {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}}
/// then the data section; offsets are relative to its start (byte 8 + N). Tensors are stored dense, row-major and
/// little-endian, and cover the data section exactly, without gaps or overlaps.
///
/// SafetensorsFile memory-maps a file and validates the whole header when it is opened, so a truncated or malformed
/// file fails at once with a message that names the file and the tensor. Loading copies one tensor at a time out of
/// the mapping; the file is never read into memory as a whole.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/types.h>
#include <nlohmann/json.hpp>

#include <rlhf/detail/error.hpp>
#include <rlhf/io/atomic_file.hpp>

static_assert(std::endian::native == std::endian::little,
              "rlhf/io/safetensors.hpp: safetensors stores little-endian data; big-endian hosts are not supported");

namespace rlhf {

/// One tensor entry of a safetensors header.
struct TensorInfo {
  std::string name;            ///< key in the header, e.g. "h.0.attn.c_attn.weight"
  torch::ScalarType dtype;     ///< torch dtype of the stored elements, e.g. torch::kFloat32
  std::string dtype_name;      ///< safetensors dtype name, e.g. "F32"
  std::vector<int64_t> shape;  ///< e.g. [768, 2304]; empty for a 0-d tensor
  uint64_t begin;              ///< first byte, relative to the start of the data section
  uint64_t end;                ///< one past the last byte, relative to the start of the data section
};

namespace detail {

// ---- dtypes ----

/// A safetensors dtype the library reads and writes, with its torch dtype and element size in bytes.
struct SafetensorsDtype {
  std::string_view name;    ///< e.g. "BF16"
  torch::ScalarType dtype;  ///< e.g. torch::kBFloat16
  uint64_t size;            ///< bytes per element, e.g. 2
};

/// Every supported safetensors dtype.
inline constexpr std::array<SafetensorsDtype, 10> kSafetensorsDtypes{{
    {"F32", torch::kFloat32, 4},
    {"F16", torch::kFloat16, 2},
    {"BF16", torch::kBFloat16, 2},
    {"F64", torch::kFloat64, 8},
    {"I64", torch::kInt64, 8},
    {"I32", torch::kInt32, 4},
    {"I16", torch::kInt16, 2},
    {"I8", torch::kInt8, 1},
    {"U8", torch::kUInt8, 1},
    {"BOOL", torch::kBool, 1},
}};

/// The supported dtype names, as listed in error messages.
inline constexpr std::string_view kSafetensorsDtypeList = "F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL";

/// Largest header the reference implementation accepts (100 MB).
inline constexpr uint64_t kSafetensorsMaxHeader = 100'000'000;

/// The dtype entry named `name` ("F32"), or nullptr.
inline const SafetensorsDtype* find_safetensors_dtype(std::string_view name) {
  for (const auto& entry : kSafetensorsDtypes) {
    if (entry.name == name) return &entry;
  }
  return nullptr;
}

/// The dtype entry for torch dtype `dtype`, or nullptr.
inline const SafetensorsDtype* find_safetensors_dtype(torch::ScalarType dtype) {
  for (const auto& entry : kSafetensorsDtypes) {
    if (entry.dtype == dtype) return &entry;
  }
  return nullptr;
}

/// "Strided", "Sparse", ...: the name torch prints for `layout`.
inline std::string layout_name(torch::Layout layout) {
  std::ostringstream out;
  out << layout;
  return out.str();
}

// ---- memory mapping ----

/// A read-only, private memory mapping of a whole file; unmapped on destruction.
class MappedFile {
 public:
  /// Maps `size` bytes of `fd` read-only (size > 0).
  MappedFile(int fd, std::size_t size, std::string_view where) : size_(size) {
    data_ = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (data_ == MAP_FAILED) {
      data_ = nullptr;
      fail("{}: cannot map {} bytes: {}", where, size, errno_text(errno));
    }
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() {
    if (data_ != nullptr) ::munmap(data_, size_);
  }

  /// First mapped byte.
  const std::byte* data() const noexcept { return static_cast<const std::byte*>(data_); }
  /// Mapped length in bytes (the file size).
  std::size_t size() const noexcept { return size_; }

 private:
  void* data_ = nullptr;
  std::size_t size_ = 0;
};

// ---- header validation ----

/// The value of `value` if it is an integer >= 0, else nullopt.
inline std::optional<uint64_t> as_non_negative_integer(const nlohmann::json& value) {
  if (value.is_number_unsigned()) return value.get<uint64_t>();
  if (value.is_number_integer() && value.get<int64_t>() >= 0) return static_cast<uint64_t>(value.get<int64_t>());
  return std::nullopt;
}

/// Validates one header entry `name: value` of the file described by `where` ("safetensors: {path}") whose data
/// section holds `data_size` bytes, and returns it as a TensorInfo.
inline TensorInfo parse_safetensors_entry(std::string_view where, const std::string& name, const nlohmann::json& value,
                                          uint64_t data_size) {
  if (!value.is_object()) {
    fail("{}: tensor '{}': entry must be an object with fields 'dtype', 'shape' and 'data_offsets'", where, name);
  }
  for (const auto& [key, field] : value.items()) {
    if (key != "dtype" && key != "shape" && key != "data_offsets") {
      fail("{}: tensor '{}': unexpected field '{}'", where, name, key);
    }
  }

  const auto dtype_it = value.find("dtype");
  if (dtype_it == value.end() || !dtype_it->is_string()) {
    fail("{}: tensor '{}': field 'dtype' must be a string", where, name);
  }
  const auto& dtype_name = dtype_it->get_ref<const std::string&>();
  const SafetensorsDtype* dtype = find_safetensors_dtype(std::string_view(dtype_name));
  if (dtype == nullptr) {
    fail("{}: tensor '{}': unsupported dtype '{}' (supported: {})", where, name, dtype_name, kSafetensorsDtypeList);
  }

  const auto shape_it = value.find("shape");
  if (shape_it == value.end() || !shape_it->is_array()) {
    fail("{}: tensor '{}': field 'shape' must be an array of non-negative integers", where, name);
  }
  std::vector<uint64_t> dims;
  dims.reserve(shape_it->size());
  for (const auto& dim : *shape_it) {
    const auto size = as_non_negative_integer(dim);
    if (!size) fail("{}: tensor '{}': field 'shape' must be an array of non-negative integers", where, name);
    dims.push_back(*size);
  }

  const auto offsets_it = value.find("data_offsets");
  std::optional<uint64_t> begin, end;
  if (offsets_it != value.end() && offsets_it->is_array() && offsets_it->size() == 2) {
    begin = as_non_negative_integer((*offsets_it)[0]);
    end = as_non_negative_integer((*offsets_it)[1]);
  }
  if (!begin || !end) {
    fail("{}: tensor '{}': field 'data_offsets' must be an array of two non-negative integers", where, name);
  }
  if (*begin > *end) fail("{}: tensor '{}': data_offsets [{}, {}] are reversed", where, name, *begin, *end);
  if (*end > data_size) {
    fail("{}: tensor '{}': data_offsets [{}, {}] run past the data section of {} bytes (truncated file?)", where, name,
         *begin, *end, data_size);
  }

  // Element count and byte size, refusing anything that would wrap. Sizes of 0 count as 1 in the bound so that the
  // strides torch derives from the shape cannot overflow either.
  constexpr uint64_t kMaxElements = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  uint64_t bound = 1;
  uint64_t numel = 1;
  bool overflow = false;
  for (const uint64_t dim : dims) {
    overflow = overflow || __builtin_mul_overflow(bound, std::max<uint64_t>(dim, 1), &bound) || bound > kMaxElements;
    numel = dim == 0 ? 0 : numel * dim;  // numel <= bound, cannot wrap while bound does not
  }
  uint64_t nbytes = 0;
  overflow = overflow || __builtin_mul_overflow(numel, dtype->size, &nbytes);
  if (overflow) {
    fail("{}: tensor '{}': shape {} x {} ({} bytes) is too large (its sizes overflow 64 bits)", where, name,
         format_shape(dims), dtype->name, dtype->size);
  }
  if (nbytes != *end - *begin) {
    fail("{}: tensor '{}': shape {} x {} ({} bytes) needs {} bytes, data_offsets span {}", where, name,
         format_shape(dims), dtype->name, dtype->size, nbytes, *end - *begin);
  }

  return TensorInfo{.name = name,
                    .dtype = dtype->dtype,
                    .dtype_name = std::string(dtype->name),
                    .shape = std::vector<int64_t>(dims.begin(), dims.end()),
                    .begin = *begin,
                    .end = *end};
}

/// Validates the "__metadata__" entry: an object of string values.
inline std::map<std::string, std::string> parse_safetensors_metadata(std::string_view where,
                                                                     const nlohmann::json& value) {
  if (!value.is_object()) fail("{}: __metadata__ must be an object of string values", where);
  std::map<std::string, std::string> metadata;
  for (const auto& [key, item] : value.items()) {
    if (!item.is_string()) fail("{}: __metadata__ must be an object of string values", where);
    metadata.emplace(key, item.get<std::string>());
  }
  return metadata;
}

/// Checks that `tensors` (sorted by begin offset) tile the `data_size` bytes of the data section exactly.
inline void check_safetensors_coverage(std::string_view where, const std::vector<TensorInfo>& tensors,
                                       uint64_t data_size) {
  if (tensors.empty()) {
    if (data_size != 0) fail("{}: {} unexpected bytes in the data section of a file with no tensors", where, data_size);
    return;
  }
  if (tensors.front().begin != 0) {
    fail("{}: gap of {} bytes before the first tensor '{}'", where, tensors.front().begin, tensors.front().name);
  }
  for (std::size_t i = 1; i < tensors.size(); ++i) {
    const TensorInfo& a = tensors[i - 1];
    const TensorInfo& b = tensors[i];
    if (b.begin < a.end) {
      fail("{}: tensors '{}' and '{}' overlap (bytes [{}, {}) and [{}, {}))", where, a.name, b.name, a.begin, a.end,
           b.begin, b.end);
    }
    if (b.begin > a.end)
      fail("{}: gap of {} bytes between tensor '{}' and '{}'", where, b.begin - a.end, a.name, b.name);
  }
  if (tensors.back().end != data_size) {
    fail("{}: {} unexpected bytes after the last tensor '{}'", where, data_size - tensors.back().end,
         tensors.back().name);
  }
}

}  // namespace detail

// ---- reading ----

/// A safetensors file, memory-mapped read-only and validated when constructed.
///
/// Tensors come out either as views of the mapping (view(): no copy) or as fresh tensors (load(): one copy, converted
/// to the requested dtype and device on the way). The mapping is shared with the views: it is unmapped when the
/// SafetensorsFile and every view of it are gone. Movable, not copyable.
class SafetensorsFile {
 public:
  /// Opens, maps and validates `path`. Throws rlhf::Error "safetensors: {path}: ..." for a missing, unreadable,
  /// truncated or malformed file; the message names the offending tensor where there is one.
  explicit SafetensorsFile(const std::filesystem::path& path) : path_(path) {
    const std::string where = "safetensors: " + path.string();
    detail::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.get() < 0) detail::fail("{}: cannot open: {}", where, detail::errno_text(errno));
    struct stat info {};
    if (::fstat(fd.get(), &info) != 0) detail::fail("{}: cannot open: {}", where, detail::errno_text(errno));
    if (S_ISDIR(info.st_mode)) detail::fail("{}: cannot open: {}", where, detail::errno_text(EISDIR));
    if (!S_ISREG(info.st_mode)) detail::fail("{}: cannot open: not a regular file", where);
    const auto size = static_cast<uint64_t>(info.st_size);
    if (size < 8) {
      detail::fail("{}: file is {} bytes, too short for the 8-byte header length (truncated?)", where, size);
    }
    mapping_ = std::make_shared<detail::MappedFile>(fd.get(), static_cast<std::size_t>(size), where);
    fd.reset();  // the mapping stays valid without the descriptor

    uint64_t header_size = 0;
    std::memcpy(&header_size, mapping_->data(), 8);  // little-endian host (static_assert above)
    if (header_size > size - 8) {
      detail::fail("{}: header length {} exceeds the {} bytes after the length prefix (truncated file?)", where,
                   header_size, size - 8);
    }
    if (header_size > detail::kSafetensorsMaxHeader) {
      detail::fail("{}: header length {} exceeds the format's limit of {} bytes", where, header_size,
                   detail::kSafetensorsMaxHeader);
    }
    data_offset_ = 8 + header_size;
    const uint64_t data_size = size - data_offset_;

    const auto* header_begin = reinterpret_cast<const char*>(mapping_->data()) + 8;
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(header_begin, header_begin + header_size);
    } catch (const nlohmann::json::parse_error& e) {
      detail::fail("{}: header is not valid JSON: {}", where, e.what());
    }
    if (!header.is_object()) detail::fail("{}: header is not a JSON object", where);

    tensors_.reserve(header.size());
    for (const auto& [name, value] : header.items()) {
      if (name == "__metadata__") {
        metadata_ = detail::parse_safetensors_metadata(where, value);
      } else {
        tensors_.push_back(detail::parse_safetensors_entry(where, name, value, data_size));
      }
    }
    std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
      return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
    });
    detail::check_safetensors_coverage(where, tensors_, data_size);
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  }

  SafetensorsFile(SafetensorsFile&&) noexcept = default;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept = default;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  /// Drops this object's share of the mapping (unmapped once no view of it remains).
  ~SafetensorsFile() = default;

  /// The path the file was opened with.
  const std::filesystem::path& path() const { return path_; }

  /// Every tensor entry, sorted by begin offset.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }

  /// The entry named `name`, or nullptr if there is none.
  const TensorInfo* find(std::string_view name) const {
    const auto it = index_.find(name);
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }

  /// The entry named `name`; throws rlhf::Error "safetensors: {path}: no tensor named '{name}'" if there is none.
  const TensorInfo& info(std::string_view name) const {
    const TensorInfo* entry = find(name);
    if (entry == nullptr) detail::fail("safetensors: {}: no tensor named '{}'", path_.string(), name);
    return *entry;
  }

  /// The "__metadata__" entry (empty if the file has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// A CPU tensor of the stored dtype and shape that aliases the mapped bytes: no copy. It is read-only (the mapping
  /// is PROT_READ; writing to it crashes) and keeps the mapping alive. If the bytes are not aligned to the element
  /// size, returns an aligned copy instead; an empty tensor is always a fresh one.
  torch::Tensor view(std::string_view name) const { return view_of(info(name)).first; }

  /// A fresh tensor (never aliasing the mapping) holding tensor `name`, converted to `options`' dtype and device
  /// where they are set (default: the stored dtype, on the CPU). `options.requires_grad(true)` is honoured; a
  /// non-strided layout is an error.
  torch::Tensor load(std::string_view name, torch::TensorOptions options = {}) const {
    return load_of(info(name), options);
  }

 private:
  // The tensor for `entry` and whether it aliases the mapping.
  std::pair<torch::Tensor, bool> view_of(const TensorInfo& entry) const {
    const auto element_options = torch::TensorOptions().dtype(entry.dtype);
    const uint64_t nbytes = entry.end - entry.begin;
    if (nbytes == 0) return {torch::empty(entry.shape, element_options), false};
    const std::byte* bytes = mapping_->data() + data_offset_ + entry.begin;
    if (entry.dtype == torch::kBool) check_bool_bytes(entry, bytes);
    const auto element_size = static_cast<std::uintptr_t>(c10::elementSize(entry.dtype));
    if (reinterpret_cast<std::uintptr_t>(bytes) % element_size != 0) {
      torch::Tensor copy = torch::empty(entry.shape, element_options);
      std::memcpy(copy.data_ptr(), bytes, nbytes);
      return {copy, false};
    }
    std::shared_ptr<const detail::MappedFile> keep_alive = mapping_;
    torch::Tensor alias = torch::from_blob(
        const_cast<std::byte*>(bytes), entry.shape, [keep_alive](void*) {}, element_options);
    return {alias, true};
  }

  torch::Tensor load_of(const TensorInfo& entry, const torch::TensorOptions& options) const {
    if (options.has_layout() && options.layout() != torch::kStrided) {
      detail::fail("safetensors: {}: tensor '{}': cannot load into layout {} (only strided tensors)", path_.string(),
                   entry.name, detail::layout_name(options.layout()));
    }
    const torch::ScalarType dtype = options.has_dtype() ? options.dtype().toScalarType() : entry.dtype;
    const torch::Device device = options.has_device() ? options.device() : torch::Device(torch::kCPU);
    auto [source, aliases] = view_of(entry);
    torch::Tensor result = (!aliases && dtype == entry.dtype && device.is_cpu())
                               ? std::move(source)
                               : source.to(device, dtype, /*non_blocking=*/false, /*copy=*/true);
    if (options.has_requires_grad() && options.requires_grad()) result.set_requires_grad(true);
    return result;
  }

  // torch assumes bool bytes are 0 or 1; anything else would give wrong results later, so refuse it here.
  void check_bool_bytes(const TensorInfo& entry, const std::byte* bytes) const {
    for (uint64_t i = 0; i < entry.end - entry.begin; ++i) {
      const auto value = static_cast<unsigned>(bytes[i]);
      if (value > 1) {
        detail::fail("safetensors: {}: tensor '{}': BOOL element {} holds byte {} (expected 0 or 1)", path_.string(),
                     entry.name, i, value);
      }
    }
  }

  std::filesystem::path path_;
  std::shared_ptr<const detail::MappedFile> mapping_;
  uint64_t data_offset_ = 0;  // 8 + header length
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::size_t, std::less<>> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
};

/// Loads every tensor of the safetensors file at `path`, each converted straight from the mapping to `options`'
/// dtype and device where they are set (default: stored dtype, CPU). Peak memory is the result plus one tensor.
inline std::map<std::string, torch::Tensor> load_safetensors(const std::filesystem::path& path,
                                                             torch::TensorOptions options = {}) {
  const SafetensorsFile file(path);
  std::map<std::string, torch::Tensor> tensors;
  for (const TensorInfo& entry : file.tensors()) tensors.emplace(entry.name, file.load(entry.name, options));
  return tensors;
}

// ---- writing ----

/// Writes `tensors` (and `metadata` as "__metadata__", omitted when empty) to `path` in the safetensors format,
/// atomically (write_file_atomic_with()): the old file survives any failure.
///
/// Tensors may live on any device and have any strides; each is copied to a contiguous CPU tensor on its own while
/// it is written, so the whole dict is never copied at once. Header entries and data are ordered by element size (largest first), then name, as the reference writer
/// orders them, so every tensor is aligned; the header
/// is compact JSON padded with spaces to a multiple of 8 bytes, as the reference implementation writes it. Throws
/// rlhf::Error "safetensors: {path}: ..." for an undefined or non-strided tensor, a dtype safetensors lacks (e.g.
/// complex), the reserved name "__metadata__", or names/metadata that are not valid UTF-8.
inline void save_safetensors(const std::filesystem::path& path, const std::map<std::string, torch::Tensor>& tensors,
                             const std::map<std::string, std::string>& metadata = {}) {
  const std::string where = "safetensors: " + path.string();

  // The reference writer's order: larger elements first, then by name, so every tensor stays aligned.
  std::vector<std::pair<std::string, torch::Tensor>> ordered(tensors.begin(), tensors.end());
  std::stable_sort(ordered.begin(), ordered.end(), [](const auto& a, const auto& b) {
    return a.second.defined() && b.second.defined() && a.second.element_size() > b.second.element_size();
  });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : ordered) {
    if (name == "__metadata__") {
      detail::fail("{}: '__metadata__' is reserved for the metadata and cannot name a tensor", where);
    }
    if (!tensor.defined()) detail::fail("{}: tensor '{}' is undefined", where, name);
    if (tensor.layout() != torch::kStrided) {
      detail::fail("{}: tensor '{}' has layout {}; only strided (dense) tensors can be saved", where, name,
                   detail::layout_name(tensor.layout()));
    }
    const detail::SafetensorsDtype* dtype = detail::find_safetensors_dtype(tensor.scalar_type());
    if (dtype == nullptr) {
      detail::fail("{}: tensor '{}': dtype {} has no safetensors equivalent (supported: {})", where, name,
                   c10::toString(tensor.scalar_type()), detail::kSafetensorsDtypeList);
    }
    const uint64_t nbytes = static_cast<uint64_t>(tensor.numel()) * dtype->size;
    nlohmann::ordered_json entry = nlohmann::ordered_json::object();
    entry["dtype"] = dtype->name;
    entry["shape"] = tensor.sizes().vec();
    entry["data_offsets"] = nlohmann::ordered_json::array({offset, offset + nbytes});
    header[name] = std::move(entry);
    offset += nbytes;
  }

  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::type_error& e) {
    detail::fail("{}: tensor names and metadata must be valid UTF-8: {}", where, e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');

  write_file_atomic_with(path, [&](std::FILE* file) {
    const uint64_t header_size = text.size();  // little-endian host (static_assert above)
    detail::write_all(file, &header_size, sizeof(header_size), where);
    detail::write_all(file, text.data(), text.size(), where);
    for (const auto& [name, tensor] : ordered) {
      if (tensor.numel() == 0) continue;
      const torch::Tensor cpu = tensor.detach().to(torch::kCPU).resolve_conj().resolve_neg().contiguous();
      detail::write_all(file, cpu.data_ptr(), static_cast<std::size_t>(cpu.numel()) * cpu.element_size(), where);
    }
  });
}

}  // namespace rlhf
