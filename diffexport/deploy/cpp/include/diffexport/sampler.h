// The deterministic EDM sampler loop (Euler or Heun) around any `Backend`.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "diffexport/engine.h"
#include "diffexport/npy.h"

namespace diffexport {

/// EDM noise levels: `t_i = (σmax^(1/ρ) + i/(N−1)(σmin^(1/ρ) − σmax^(1/ρ)))^ρ` for i < N, then 0.
std::vector<double> edm_sigmas(int num_steps, double sigma_min, double sigma_max, double rho);

using Conditions = std::map<std::string, Array>;  ///< condition name -> [N, ...] array

struct SamplerOptions {
  int steps = 0;                 ///< > 0: recompute an EDM schedule with this many steps
  std::string backend = "auto";  ///< "auto" | "aoti" | "tensorrt"
  int threads = 0;               ///< > 0: CPU threads for the backend
};

/// Samples with an engine directory's denoiser and sampler settings (manifest.json).
///
/// `latents` are the initial state x [N, C, H, W] at σ_0 (noise already scaled: σ_0·ε, as
/// `diffexport.runtime.sample(latents=...)` takes them). Each step σ → σ' takes
/// d = (x − D(x, σ))/σ, x' = x + (σ' − σ)·d; Heun corrects with d' at (x', σ') as
/// x' = x + (σ' − σ)·(d + d')/2, except on the last step to σ' = 0 (EDM: 2N − 1 evaluations).
/// N may exceed the engine's batch range: it runs in chunks of at most `io.batch.max`.
class Sampler {
 public:
  explicit Sampler(const std::string& engine_dir, const SamplerOptions& options = {});

  Array sample(const Array& latents, const Conditions& conditions = {});

  const Engine& engine() const { return engine_; }
  const Backend& backend() const { return *backend_; }
  const std::vector<double>& sigmas() const { return sigmas_; }
  int evaluations() const;  ///< denoiser calls per chunk (2N−1 for Heun, N for Euler)

 private:
  void check(const Array& latents, const Conditions& conditions) const;
  void run_chunk(std::vector<Array>& inputs, float* out);

  Engine engine_;
  std::vector<double> sigmas_;
  bool heun_ = true;
  std::unique_ptr<Backend> backend_;
};

}  // namespace diffexport
