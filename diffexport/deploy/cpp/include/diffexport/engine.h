// An engine directory (docs/ENGINE_FORMAT.md) as the C++ runner sees it, and the `Backend`
// interface every denoiser runtime (AOTInductor, TensorRT) implements.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "diffexport/manifest_json.h"
#include "diffexport/npy.h"

namespace diffexport {

/// One engine input or output; `shape[0] == -1` is the dynamic batch.
struct TensorSpec {
  std::string name, kind;  // kind: x | sigma | vector | image | index | denoised
  DType dtype = DType::Float32;
  std::vector<int64_t> shape;
  int64_t high = 0;  // kind index: values lie in [0, high) (io "high"; 0 when the manifest does not record it)
};

/// The sampler the engine was built for (`manifest.sampler`, docs/ENGINE_FORMAT.md).
struct SamplerSpec {
  std::string scheduler;         // noise scheduler class name, e.g. "EDMNoiseScheduler"
  Json scheduler_args = Json::object();  // its resolved arguments
  std::string solver;            // euler | heun | edm_stochastic_euler | edm_stochastic_heun | ddim
  int num_steps = 0;
  std::vector<double> time_steps;  // the N + 1 solver times (empty: compute from the scheduler)
  bool integer_times = false;      // discrete time steps (DDPMScheduler: T-1 ... 0, -1)
  Json solver_options = Json::object();
  bool patching = false;
};

struct Engine {
  std::string dir, name;
  Json manifest;
  std::vector<TensorSpec> inputs, outputs;  // inputs in call order: x, sigma, conditions...
  int64_t batch_min = 1, batch_opt = 1, batch_max = 1;
  SamplerSpec sampler;

  /// Path of `target`'s artifact ("aoti", "tensorrt"), after checking it exists and its
  /// sha256 matches the manifest; `Error` naming the file otherwise.
  std::string verified_artifact(const std::string& target) const;
};

/// Read and check `DIR/manifest.json`; `Error` naming the file and field when it is unusable.
Engine load_engine(const std::string& dir);

/// `Error` naming the condition, the first bad value, its row and the range when the int64 values of
/// the index input `spec` are not all in [0, spec.high) (>= 0 when `high` is not recorded); the message
/// starts with `where` (e.g. "FILE: ").
void check_index_range(const TensorSpec& spec, const Array& values, const std::string& where = "");

/// A view of one host tensor handed to a backend.
struct TensorView {
  const void* data;
  DType dtype;
  std::vector<int64_t> shape;
};

/// Runs the exported denoiser: `denoised [B, C, H, W] = D(x, sigma, conditions...)`.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  /// `inputs` in the engine's input order, batch B within the engine's range, host memory;
  /// writes B*C*H*W floats to `denoised` (host memory).
  virtual void run(const std::vector<TensorView>& inputs, float* denoised) = 0;
};

/// Hex SHA-256 of a file's bytes (OpenSSL EVP); `Error` naming the file when it cannot be read.
std::string sha256_file(const std::string& path);

/// The backend that `name` ("aoti", "tensorrt" or "auto") selects: "auto" is the first built
/// artifact that this binary can run, TensorRT first. `Error` for an unknown name.
std::string resolve_backend(const Engine& engine, const std::string& name);

/// Open the backend `name` (see `resolve_backend`). `threads` > 0 sets the CPU threads (AOTInductor).
std::unique_ptr<Backend> open_backend(const Engine& engine, const std::string& name = "auto", int threads = 0);

std::unique_ptr<Backend> open_aoti(const Engine& engine, int threads);
std::unique_ptr<Backend> open_tensorrt(const Engine& engine);  // only with DIFFEXPORT_WITH_TENSORRT

}  // namespace diffexport
