// Condition inputs in the forms `diffexport sample` takes them (diffexport/cli/run.py), turned into
// the [N, ...] arrays of the engine's dtypes that `Sampler::sample` takes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "diffexport/engine.h"
#include "diffexport/npy.h"

namespace diffexport {

/// One-hot rows [n, K] of the class `labels`, cycled over n, for the vector input `spec` (K: its last
/// dimension), as Python's `one_hot_condition`. `Error` "condition 'NAME': class labels must be integers
/// in 0..K-1, got [...]" when `labels` is empty or one is outside that range.
Array one_hot(const TensorSpec& spec, const std::vector<int64_t>& labels, int64_t n);

/// `values` given for the condition input `spec` as the [n, ...] array the engine takes, as `diffexport
/// sample` converts them: a 1-D integer array for a vector input holds class indices (at most n, one-hot,
/// cycled over n); one row, with or without the batch axis, is repeated over n; integers and float64
/// become float32 for float inputs, integral floats int64 for index inputs, whose values must lie in [0, high).
/// `Error` (prefixed with `source`, e.g. the file, and ": ") for an empty array, NaN/Inf, a wrong shape,
/// non-integral or out-of-range index values.
Array condition_input(const TensorSpec& spec, const Array& values, int64_t n, const std::string& source = "");

}  // namespace diffexport
