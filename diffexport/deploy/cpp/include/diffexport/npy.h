// Host arrays and the NumPy `.npy` format (v1/v2/v3; arrays are float32, float64 or int64, files may hold any float or integer).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace diffexport {

enum class DType { Float32, Int64, Float64 };  // Float64: only as read from a .npy file

const char* dtype_name(DType dtype);           ///< "float32" | "int64" | "float64"
DType parse_dtype(const std::string& name);    ///< "float32" | "int64" (an engine's dtypes); `Error` otherwise
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
  double* f64();  ///< `Error` unless float64
  const double* f64() const;
};

/// A `.npy` file's header: its dtype as written (e.g. "<f4", ">i2") and its shape.
struct NpyHeader {
  std::string descr;
  std::vector<int64_t> shape;
};

/// The header of a `.npy` file `read_npy` would read, checked as it checks it (a supported dtype, a file
/// size that matches the shape), without reading the data.
NpyHeader read_npy_header(const std::string& path);

/// Read a `.npy` file as `diffexport sample` reads it: float16/float32 as float32 (exactly), float64 as
/// float64, any integer as int64 (either byte order), C or Fortran order; `Error` naming the file for a
/// bad header, another dtype (complex, bool, ...), a uint64 beyond int64, or a size that does not match the shape.
Array read_npy(const std::string& path);

/// Write `array` as a v1.0 `.npy` file (via a temporary file renamed into place).
void write_npy(const std::string& path, const Array& array);

}  // namespace diffexport
