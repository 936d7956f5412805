// Host arrays and the NumPy `.npy` format (v1/v2/v3, C order, little endian; float32 and int64).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace diffexport {

enum class DType { Float32, Int64 };

const char* dtype_name(DType dtype);           ///< "float32" | "int64"
DType parse_dtype(const std::string& name);    ///< inverse of dtype_name; `Error` otherwise
size_t dtype_size(DType dtype);

std::string shape_str(const std::vector<int64_t>& shape);  ///< "[2, 3, 16, 16]"
int64_t numel(const std::vector<int64_t>& shape);

/// A dense C-order array in host memory.
struct Array {
  DType dtype = DType::Float32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;

  Array() = default;
  Array(DType dtype, std::vector<int64_t> shape);  ///< zero-filled

  int64_t numel() const { return diffexport::numel(shape); }
  float* f32();  ///< `Error` unless float32
  const float* f32() const;
  int64_t* i64();  ///< `Error` unless int64
  const int64_t* i64() const;
};

/// Read a `.npy` file; `Error` naming the file for a bad header, an unsupported dtype
/// (only '<f4' and '<i8'), Fortran order, or a size that does not match the shape.
Array read_npy(const std::string& path);

/// Write `array` as a v1.0 `.npy` file (via a temporary file renamed into place).
void write_npy(const std::string& path, const Array& array);

}  // namespace diffexport
