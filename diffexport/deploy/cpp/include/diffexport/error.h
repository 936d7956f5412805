// The one exception type of the runtime: its message is a single line that names the file or tensor.
#pragma once

#include <stdexcept>

namespace diffexport {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace diffexport
