// The sampler loop the manifest records, around any `Backend`: EDM, VE, VP, iDDPM and DDPM
// schedules; Euler, Heun, the EDM stochastic samplers and DDIM.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "diffexport/engine.h"
#include "diffexport/npy.h"

namespace diffexport {

using Conditions = std::map<std::string, Array>;  ///< condition name -> [N, ...] array

struct SamplerOptions {
  int steps = 0;                  ///< > 0: re-discretise the manifest's schedule with this many steps
  std::string backend = "auto";   ///< "auto" | "aoti" | "tensorrt"
  int threads = 0;                ///< > 0: CPU threads for the backend
  uint64_t seed = 0;              ///< seeds the latents drawn by `sample(n)` and every per-step noise
  bool allow_unverified = false;  ///< run an engine whose parity status is not ok (debugging only)
};

class Schedule;  // the noise scheduler's formulas (sampler.cpp)

/// Samples with an engine directory's denoiser and the sampler its manifest records; the math of
/// `diffexport.runtime.sample` (diffexport/diffusion/samplers.py) step for step, in libtorch's ATen
/// ops, so the results match the Python runtime's to float rounding of the denoiser.
///
/// Refuses (`UnverifiedEngine`, one line) an engine whose parity status is not ok unless
/// `options.allow_unverified`, and (`Error`) a sampler it cannot run (patching). Classifier-free
/// guidance (`sampler.guidance.cfg`) runs as in Python: uncond + cfg·(cond − uncond), the
/// unconditional call with the vector conditions zeroed.
/// The N rows are integrated together; denoiser calls run in chunks of the engine's batch range.
/// Noise comes from one CPU `at::Generator` seeded with `options.seed` (or the recipe's
/// `solver_options.generator`) and is drawn in the Python runtime's order, so a seed gives the
/// same samples as `diffexport sample --seed` on the same latents.
class Sampler {
 public:
  explicit Sampler(const std::string& engine_dir, const SamplerOptions& options = {});
  ~Sampler();

  /// `latents` are the initial state x [N, C, H, W] at the first time step (noise already scaled:
  /// σ_max·ε, or ε for DDPM), as `diffexport.runtime.sample(latents=...)` takes them.
  Array sample(const Array& latents, const Conditions& conditions = {});
  /// Draws the initial latents from the seed first, like `diffexport sample --seed S --batch N`.
  Array sample(int64_t n, const Conditions& conditions = {});

  const Engine& engine() const { return engine_; }
  const Backend& backend() const { return *backend_; }
  const std::vector<double>& time_steps() const { return times_; }  ///< the N + 1 solver times
  const std::vector<double>& sigmas() const { return sigmas_; }      ///< EDM noise level at each time
  int steps() const { return static_cast<int>(times_.size()) - 1; }
  int evaluations() const;  ///< denoiser calls per sample (e.g. 2N−1 for Heun, N for Euler and DDIM; twice with guidance)
  double guidance() const { return guidance_; }  ///< classifier-free guidance scale (1: none)

 private:
  void check(const Array& latents, const Conditions& conditions) const;
  Array run(const Array& latents, const Conditions& conditions, bool draw_latents);

  Engine engine_;
  SamplerOptions options_;
  std::shared_ptr<const Schedule> schedule_;
  std::vector<double> times_, sigmas_;
  double guidance_ = 1.0;
  std::vector<double> clip_;  // [low, high] the samples are clamped to (sampler.clip), or empty
  std::vector<double> levels_;  // the preconditioner's noise levels churned ones round to (sampler.round_sigma), or empty
  std::unique_ptr<Backend> backend_;
};

}  // namespace diffexport
