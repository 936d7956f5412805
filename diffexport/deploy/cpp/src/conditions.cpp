// Condition inputs as `diffexport sample` takes them (diffexport/cli/run.py `_parse_conditions`,
// diffexport/runtime/sampler.py `check_conditions` and `one_hot_condition`), with the same messages.
#include "diffexport/conditions.h"

#include <cmath>
#include <cstdio>
#include <cstring>

#include "diffexport/error.h"

namespace diffexport {
namespace {

/// Python's repr of a list of ints: "[0, 7]".
std::string int_list(const std::vector<int64_t>& values) {
  std::string s = "[";
  for (size_t i = 0; i < values.size(); ++i) s += (i ? ", " : "") + std::to_string(values[i]);
  return s + "]";
}

/// `values` [rows..., ...] with its first `values.shape[0]` rows repeated (cycled) to `n` rows.
Array cycle_rows(const Array& values, int64_t n) {
  std::vector<int64_t> shape = values.shape;
  shape[0] = n;
  Array out(values.dtype, shape);
  const size_t row = values.bytes.size() / static_cast<size_t>(values.shape[0]);
  for (int64_t i = 0; i < n; ++i) std::memcpy(out.bytes.data() + i * row, values.bytes.data() + (i % values.shape[0]) * row, row);
  return out;
}

/// Element i of a float32 or float64 array, exactly.
double real(const Array& values, int64_t i) { return values.dtype == DType::Float64 ? values.f64()[i] : values.f32()[i]; }

/// The engine dtype of `values`, as `check_conditions` casts them: integers and float64 as float32 for a float
/// input; integral floats as int64 for an index input, checked (non-integers, then the range) before the cast.
Array to_dtype(const TensorSpec& spec, const Array& values, const std::string& where) {
  if (values.dtype == spec.dtype) return values;
  Array out(spec.dtype, values.shape);
  const int64_t n = values.numel();
  if (spec.dtype == DType::Float32) {
    for (int64_t i = 0; i < n; ++i)
      out.f32()[i] = values.dtype == DType::Int64 ? static_cast<float>(values.i64()[i]) : static_cast<float>(real(values, i));
    return out;
  }
  for (int64_t i = 0; i < n; ++i)
    if (real(values, i) != std::floor(real(values, i)))
      throw Error(where + "condition '" + spec.name + "' is an index (int64) but holds non-integer values");
  for (int64_t i = 0; i < n; ++i) {
    const double v = real(values, i);
    char text[400];  // an integral double in full, as Python's int(v): 1e20 -> 100000000000000000000
    std::snprintf(text, sizeof text, "%.0f", v);
    if (v < 0 || (spec.high > 0 && v >= spec.high))
      throw Error(where + "condition '" + spec.name + "' holds " + text + " at row " + std::to_string(i) + ", " +
                  (spec.high > 0 ? "outside its range [0, " + std::to_string(spec.high) + ")" : std::string("but must be >= 0")));
    if (v >= 9223372036854775808.0) throw Error(where + "condition '" + spec.name + "' holds " + text + " at row " + std::to_string(i) + ", beyond int64");
    out.i64()[i] = static_cast<int64_t>(v);
  }
  return out;
}

}  // namespace

Array one_hot(const TensorSpec& spec, const std::vector<int64_t>& labels, int64_t n) {
  const int64_t k = spec.shape.empty() ? 0 : spec.shape.back();
  bool bad = labels.empty();
  for (int64_t v : labels) bad = bad || v < 0 || v >= k;
  if (bad) throw Error("condition '" + spec.name + "': class labels must be integers in 0.." + std::to_string(k - 1) + ", got " + int_list(labels));
  Array out(DType::Float32, {n, k});
  for (int64_t i = 0; i < n; ++i) out.f32()[i * k + labels[i % labels.size()]] = 1.0f;
  return out;
}

Array condition_input(const TensorSpec& spec, const Array& values, int64_t n, const std::string& source) {
  const std::string where = source.empty() ? "" : source + ": ";
  const std::string name = "condition '" + spec.name + "'";
  if (values.numel() == 0) throw Error(where + name + " is empty (shape " + shape_str(values.shape) + ")");
  if (values.dtype != DType::Int64) {
    int64_t bad = 0;
    for (int64_t i = 0; i < values.numel(); ++i) bad += !std::isfinite(real(values, i));
    if (bad) throw Error(where + name + " holds " + std::to_string(bad) + " NaN/Inf values");
  }
  Array t = values;
  if (spec.kind == "vector" && t.dtype == DType::Int64 && t.shape.size() == 1) {  // class indices
    if (t.shape[0] > n)
      throw Error(where + name + " (class indices) must have at most " + std::to_string(n) +
                  " rows, the batch (fewer are cycled over it), got " + std::to_string(t.shape[0]));
    try {
      t = one_hot(spec, std::vector<int64_t>(t.i64(), t.i64() + t.numel()), n);
    } catch (const Error& e) {
      throw Error(where + e.what());
    }
  }
  const std::vector<int64_t> want(spec.shape.begin() + 1, spec.shape.end());
  std::vector<int64_t> batched = want, one = want;
  batched.insert(batched.begin(), n);
  one.insert(one.begin(), 1);
  if (t.shape == want || t.shape == one) {
    t.shape = one;
    t = cycle_rows(t, n);
  }
  if (t.shape != batched)
    throw Error(where + name + " (" + spec.kind + ") must have shape " + shape_str(batched) + " or " + shape_str(want) + ", got " +
                shape_str(t.shape));
  t = to_dtype(spec, t, where);
  if (spec.kind == "index") check_index_range(spec, t, where);
  return t;
}

}  // namespace diffexport
