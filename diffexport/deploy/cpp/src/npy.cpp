// `.npy` reader/writer. Format: magic "\x93NUMPY", version (major, minor), header length
// (uint16 for v1, uint32 for v2/v3, little endian), then a Python dict literal
// {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } padded with spaces and '\n'.
#include "diffexport/npy.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <algorithm>
#include <cstdlib>
#include <limits>
#include <map>

#include "diffexport/error.h"

namespace diffexport {

const char* dtype_name(DType dtype) {
  return dtype == DType::Float32 ? "float32" : dtype == DType::Int64 ? "int64" : "float64";
}

DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::Float32;
  if (name == "int64") return DType::Int64;
  throw Error("unsupported dtype '" + name + "' (expected float32 or int64)");
}

size_t dtype_size(DType dtype) { return dtype == DType::Float32 ? 4 : 8; }

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Array::Array(DType dtype_, std::vector<int64_t> shape_)
    : dtype(dtype_), shape(std::move(shape_)), bytes(static_cast<size_t>(diffexport::numel(shape)) * dtype_size(dtype)) {}

float* Array::f32() { return const_cast<float*>(static_cast<const Array*>(this)->f32()); }
int64_t* Array::i64() { return const_cast<int64_t*>(static_cast<const Array*>(this)->i64()); }
double* Array::f64() { return const_cast<double*>(static_cast<const Array*>(this)->f64()); }

const float* Array::f32() const {
  if (dtype != DType::Float32) throw Error(std::string("array is ") + dtype_name(dtype) + ", not float32");
  return reinterpret_cast<const float*>(bytes.data());
}

const int64_t* Array::i64() const {
  if (dtype != DType::Int64) throw Error(std::string("array is ") + dtype_name(dtype) + ", not int64");
  return reinterpret_cast<const int64_t*>(bytes.data());
}

const double* Array::f64() const {
  if (dtype != DType::Float64) throw Error(std::string("array is ") + dtype_name(dtype) + ", not float64");
  return reinterpret_cast<const double*>(bytes.data());
}

namespace {

/// The header's dict literal: string keys; values are strings, True/False or int tuples.
class HeaderParser {
 public:
  struct Value {
    std::string text;  // a string value, or "True"/"False"
    std::vector<int64_t> ints;
    bool is_tuple = false;
  };

  HeaderParser(const std::string& s, const std::string& path) : s_(s), path_(path) {}

  std::map<std::string, Value> dict() {
    std::map<std::string, Value> out;
    expect('{');
    while (!peek('}')) {
      std::string key = quoted();
      expect(':');
      out[key] = value();
      if (!peek('}')) expect(',');
    }
    expect('}');
    return out;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    std::string shown = s_.substr(0, 120);  // printable, one line
    for (char& c : shown) c = c >= 0x20 && c < 0x7F ? c : '?';
    throw Error(path_ + ": bad .npy header (" + what + " at character " + std::to_string(i_) + "): " + shown);
  }
  void space() {
    while (i_ < s_.size() && std::strchr(" \t\r\n", s_[i_])) ++i_;
  }
  bool peek(char c) {
    space();
    return i_ < s_.size() && s_[i_] == c;
  }
  void expect(char c) {
    if (!peek(c)) fail(std::string("expected '") + c + "'");
    ++i_;
  }
  std::string quoted() {
    space();
    if (i_ >= s_.size() || (s_[i_] != '\'' && s_[i_] != '"')) fail("expected a quoted string");
    char q = s_[i_++];
    size_t end = s_.find(q, i_);
    if (end == std::string::npos) fail("unterminated string");
    std::string out = s_.substr(i_, end - i_);
    i_ = end + 1;
    return out;
  }
  int64_t integer() {
    space();
    size_t start = i_;
    while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') ++i_;
    if (i_ == start || i_ - start > 15) fail("expected a dimension size");
    int64_t v = std::stoll(s_.substr(start, i_ - start));
    if (i_ < s_.size() && s_[i_] == 'L') ++i_;  // Python 2 long literals
    return v;
  }
  Value value() {
    Value v;
    if (peek('(')) {
      ++i_;
      v.is_tuple = true;
      while (!peek(')')) {
        v.ints.push_back(integer());
        if (!peek(')')) expect(',');
      }
      ++i_;
    } else if (peek('\'') || peek('"')) {
      v.text = quoted();
    } else if (s_.compare(i_, 4, "True") == 0 || s_.compare(i_, 5, "False") == 0) {
      v.text = s_[i_] == 'T' ? "True" : "False";
      i_ += v.text.size();
    } else {
      fail("unsupported value");
    }
    return v;
  }

  const std::string& s_;
  const std::string& path_;
  size_t i_ = 0;
};

uint32_t le32(const unsigned char* p) { return p[0] | p[1] << 8 | p[2] << 16 | uint32_t(p[3]) << 24; }

/// IEEE binary16 -> float, exactly (subnormals, inf and nan included).
float half_to_float(uint16_t h) {
  const int exponent = (h >> 10) & 0x1F, fraction = h & 0x3FF;
  float v;
  if (exponent == 0) v = std::ldexp(static_cast<float>(fraction), -24);  // zero or subnormal
  else if (exponent == 31) v = fraction ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  else v = std::ldexp(static_cast<float>(fraction | 0x400), exponent - 25);
  return h >> 15 ? -v : v;
}

/// An open `.npy` file positioned at its data, with its parsed header.
struct NpyFile {
  std::ifstream in;
  NpyHeader header;
  bool fortran = false;
  char kind = '?';  // 'f', 'i' or 'u'
  int size = 0;     // bytes per element
  bool swap = false;
  uint64_t data_bytes = 0;
};

void open_npy(const std::string& path, NpyFile& f) {
  std::ifstream& in = f.in;
  in.open(path, std::ios::binary | std::ios::ate);
  if (!in) throw Error(path + ": cannot open file");
  const auto file_size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  unsigned char pre[12] = {};
  in.read(reinterpret_cast<char*>(pre), 10);
  if (in.gcount() < 10 || std::memcmp(pre, "\x93NUMPY", 6) != 0) throw Error(path + ": not a .npy file (bad magic)");
  const int major = pre[6];
  if (major < 1 || major > 3) throw Error(path + ": unsupported .npy version " + std::to_string(major) + "." + std::to_string(pre[7]));
  uint64_t header_len = pre[8] | pre[9] << 8, offset = 10;
  if (major >= 2) {
    in.read(reinterpret_cast<char*>(pre + 10), 2);
    header_len = le32(pre + 8), offset = 12;
  }
  if (offset + header_len > file_size) throw Error(path + ": truncated .npy header");
  std::string header(header_len, '\0');
  in.read(&header[0], static_cast<std::streamsize>(header_len));
  while (!header.empty() && std::strchr(" \n\r\t", header.back())) header.pop_back();

  auto dict = HeaderParser(header, path).dict();
  for (const char* key : {"descr", "fortran_order", "shape"})
    if (!dict.count(key)) throw Error(path + ": .npy header has no '" + key + "'");
  const auto& descr = dict["descr"].text;
  f.fortran = dict["fortran_order"].text == "True";
  if (!dict["shape"].is_tuple) throw Error(path + ": .npy header 'shape' is not a tuple");
  // as `diffexport sample` reads them: any float (f2, f4, f8), any integer, either byte order, C or Fortran order
  const char order = descr.empty() ? '?' : descr[0], kind = descr.size() > 1 ? descr[1] : '?';
  const int size = descr.size() > 2 ? std::atoi(descr.c_str() + 2) : 0;
  const bool known = (order == '<' || order == '>' || order == '|' || order == '=') &&
                     ((kind == 'f' && (size == 2 || size == 4 || size == 8)) || ((kind == 'i' || kind == 'u') && (size == 1 || size == 2 || size == 4 || size == 8)));
  if (!known || descr.size() != 2 + std::to_string(size).size())
    throw Error(path + ": dtype '" + descr + "' is not supported (float16/32/64, or integers for index and class-label conditions)");
  f.header = {descr, dict["shape"].ints};
  f.kind = kind, f.size = size;
  f.swap = order == '>' && size > 1;  // hosts are little endian (x86-64, aarch64)

  const std::vector<int64_t>& shape = f.header.shape;
  uint64_t expected = static_cast<uint64_t>(size);  // data bytes, saturating instead of overflowing
  for (int64_t d : shape) expected = d && expected > (UINT64_MAX >> 1) / d ? UINT64_MAX >> 1 : expected * d;
  expected += offset + header_len;
  if (file_size != expected)
    throw Error(path + ": file has " + std::to_string(file_size) + " bytes but shape " + shape_str(shape) + " '" + descr +
                "' needs " + std::to_string(expected) + (file_size < expected ? " (truncated)" : ""));
  f.data_bytes = expected - offset - header_len;
}

}  // namespace

NpyHeader read_npy_header(const std::string& path) {
  NpyFile f;
  open_npy(path, f);
  return f.header;
}

Array read_npy(const std::string& path) {
  NpyFile f;
  open_npy(path, f);
  const std::vector<int64_t>& shape = f.header.shape;
  const int size = f.size;
  std::vector<unsigned char> raw(static_cast<size_t>(f.data_bytes));  // allocated once the file is known to hold it
  f.in.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(raw.size()));
  if (!f.in) throw Error(path + ": read error");
  Array a(f.kind != 'f' ? DType::Int64 : size == 8 ? DType::Float64 : DType::Float32, shape);
  const int64_t n = a.numel();
  for (int64_t i = 0; i < n; ++i) {
    int64_t src = i;  // Fortran order: the element at C index i is stored at its column-major offset
    if (f.fortran) {
      src = 0;
      int64_t rest = i, stride = 1;
      std::vector<int64_t> index(shape.size());
      for (int64_t k = static_cast<int64_t>(shape.size()) - 1; k >= 0; --k) index[k] = rest % shape[k], rest /= shape[k];
      for (size_t k = 0; k < shape.size(); ++k) src += index[k] * stride, stride *= shape[k];
    }
    unsigned char b[8];
    std::memcpy(b, raw.data() + src * size, size);
    if (f.swap) std::reverse(b, b + size);
    if (f.kind == 'f' && size == 2) {
      uint16_t h;
      std::memcpy(&h, b, 2);
      a.f32()[i] = half_to_float(h);
    } else if (f.kind == 'f') {
      std::memcpy(size == 4 ? static_cast<void*>(a.f32() + i) : static_cast<void*>(a.f64() + i), b, size);
    } else {
      uint64_t u = 0;
      std::memcpy(&u, b, size);
      if (f.kind == 'i' && size < 8 && (u >> (8 * size - 1)) & 1) u |= ~uint64_t(0) << (8 * size);  // sign-extend
      if (f.kind == 'u' && size == 8 && u > uint64_t(INT64_MAX))
        throw Error(path + ": value " + std::to_string(u) + " at element " + std::to_string(i) + " does not fit int64");
      a.i64()[i] = static_cast<int64_t>(u);
    }
  }
  return a;
}

void write_npy(const std::string& path, const Array& a) {
  std::string shape = "(";
  for (int64_t d : a.shape) shape += std::to_string(d) + ", ";
  if (a.shape.size() > 1) shape.resize(shape.size() - 2);
  else if (a.shape.size() == 1) shape.resize(shape.size() - 1);  // "(5,)"
  shape += ")";
  std::string header = std::string("{'descr': '") + (a.dtype == DType::Float32 ? "<f4" : a.dtype == DType::Int64 ? "<i8" : "<f8") +
                       "', 'fortran_order': False, 'shape': " + shape + ", }";
  header.append(63 - (10 + header.size()) % 64, ' ');  // magic + header + '\n' is a multiple of 64
  header += '\n';
  const std::string tmp = path + ".tmp";
  std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
  if (!out) throw Error(path + ": cannot write file");
  const char lo = static_cast<char>(header.size() & 0xFF), hi = static_cast<char>(header.size() >> 8);
  out.write("\x93NUMPY\x01\x00", 8).put(lo).put(hi);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(reinterpret_cast<const char*>(a.bytes.data()), static_cast<std::streamsize>(a.bytes.size()));
  out.close();
  if (out.fail() || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Error(path + ": write error (disk full or no permission?)");
  }
}

}  // namespace diffexport
