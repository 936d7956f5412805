#include "diffexport/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace diffexport {
namespace {

/// Rows [start, start + n) of `a`, padded to `b` rows by repeating the last one.
Array rows(const Array& a, int64_t start, int64_t n, int64_t b) {
  std::vector<int64_t> shape = a.shape;
  shape[0] = b;
  Array out(a.dtype, shape);
  const size_t row = out.bytes.size() / static_cast<size_t>(b);
  std::memcpy(out.bytes.data(), a.bytes.data() + start * row, n * row);
  for (int64_t k = n; k < b; ++k) std::memcpy(out.bytes.data() + k * row, a.bytes.data() + (start + n - 1) * row, row);
  return out;
}

/// The noise levels to integrate over: the manifest's `sampler.sigmas`, or the EDM formula when
/// `steps` overrides num_steps (or the manifest has none). The loop integrates in σ, which is the
/// solver's time only for the EDM scheduler (t = σ, α = 1); other schedulers are refused.
std::vector<double> schedule(const Engine& e, int steps) {
  const SamplerSpec& s = e.sampler;
  const std::string where = e.dir + "/manifest.json: sampler.";
  if (s.scheduler != "EDMNoiseScheduler")
    throw Error(where + "scheduler.class: '" + s.scheduler + "' is not supported by the C++ runner (EDMNoiseScheduler)");
  if (s.solver != "euler" && s.solver != "heun")
    throw Error(where + "solver: '" + s.solver + "' is not supported by the C++ runner (euler, heun)");
  if (!s.solver_options.empty()) throw Error(where + "solver_options: not supported by the C++ runner (" + s.solver_options[0] + ")");
  if (s.patching) throw Error(where + "patching: patch-based sampling is not supported by the C++ runner");
  std::vector<double> sigmas = s.sigmas;
  if (sigmas.empty() || (steps > 0 && steps != s.num_steps)) {
    if (!(s.sigma_min > 0 && s.sigma_max > s.sigma_min && s.rho > 0))
      throw Error(where + "scheduler.args: sigma_min, sigma_max and rho are needed to compute the noise levels");
    sigmas = edm_sigmas(steps > 0 ? steps : s.num_steps, s.sigma_min, s.sigma_max, s.rho);
  }
  bool ok = sigmas.size() >= 2 && sigmas.back() == 0.0;
  for (size_t i = 0; ok && i + 1 < sigmas.size(); ++i) ok = sigmas[i] > sigmas[i + 1] && std::isfinite(sigmas[i]);
  if (!ok) throw Error(where + "sigmas: expected decreasing positive noise levels ending with 0");
  return sigmas;
}

}  // namespace

std::vector<double> edm_sigmas(int num_steps, double sigma_min, double sigma_max, double rho) {
  if (num_steps < 1) throw Error("num_steps must be >= 1, got " + std::to_string(num_steps));
  std::vector<double> t;
  const double hi = std::pow(sigma_max, 1 / rho), lo = std::pow(sigma_min, 1 / rho);
  for (int i = 0; i < num_steps; ++i)
    t.push_back(std::pow(hi + (num_steps > 1 ? double(i) / (num_steps - 1) : 0.0) * (lo - hi), rho));
  t.push_back(0.0);
  return t;
}

Sampler::Sampler(const std::string& engine_dir, const SamplerOptions& options)
    : engine_(load_engine(engine_dir)), sigmas_(schedule(engine_, options.steps)), heun_(engine_.sampler.solver == "heun"),
      backend_(open_backend(engine_, options.backend, options.threads)) {}

int Sampler::evaluations() const {
  int n = 0;
  for (size_t i = 0; i + 1 < sigmas_.size(); ++i) n += heun_ && sigmas_[i + 1] > 0 ? 2 : 1;
  return n;
}

void Sampler::check(const Array& latents, const Conditions& conditions) const {
  const TensorSpec& x = engine_.inputs[0];
  std::vector<int64_t> want = x.shape;
  want[0] = latents.shape.empty() ? 0 : latents.shape[0];
  if (latents.dtype != DType::Float32 || latents.shape != want || want[0] < 1) {
    std::string dims = "[N";
    for (size_t k = 1; k < x.shape.size(); ++k) dims += ", " + std::to_string(x.shape[k]);
    throw Error("latents: expected float32 " + dims + "] like the engine's input 'x', got " + dtype_name(latents.dtype) + " " +
                shape_str(latents.shape));
  }
  std::string names;
  for (size_t i = 2; i < engine_.inputs.size(); ++i) {
    const TensorSpec& spec = engine_.inputs[i];
    names += (names.empty() ? "" : ", ") + spec.name;
    std::vector<int64_t> shape = spec.shape;
    shape[0] = want[0];
    auto it = conditions.find(spec.name);
    const std::string expected = std::string(dtype_name(spec.dtype)) + " " + shape_str(shape);
    if (it == conditions.end()) throw Error("missing condition '" + spec.name + "' (" + spec.kind + ", " + expected + ")");
    if (it->second.dtype != spec.dtype || it->second.shape != shape)
      throw Error("condition '" + spec.name + "': expected " + expected + ", got " + dtype_name(it->second.dtype) + " " +
                  shape_str(it->second.shape));
  }
  for (const auto& kv : conditions)
    if (std::none_of(engine_.inputs.begin() + 2, engine_.inputs.end(), [&](const TensorSpec& s) { return s.name == kv.first; }))
      throw Error("unknown condition '" + kv.first + "'; the engine takes " + (names.empty() ? "none" : names));
}

Array Sampler::sample(const Array& latents, const Conditions& conditions) {
  check(latents, conditions);
  const int64_t n_total = latents.shape[0];
  Array out(DType::Float32, latents.shape);
  const size_t row = latents.bytes.size() / static_cast<size_t>(n_total) / sizeof(float);
  for (int64_t start = 0; start < n_total; start += engine_.batch_max) {
    const int64_t n = std::min(engine_.batch_max, n_total - start), b = std::max(n, engine_.batch_min);
    std::vector<Array> inputs{rows(latents, start, n, b), Array(DType::Float32, {b})};
    for (size_t i = 2; i < engine_.inputs.size(); ++i) inputs.push_back(rows(conditions.at(engine_.inputs[i].name), start, n, b));
    std::vector<float> chunk(b * row);
    run_chunk(inputs, chunk.data());
    std::memcpy(out.f32() + start * row, chunk.data(), n * row * sizeof(float));
  }
  return out;
}

void Sampler::run_chunk(std::vector<Array>& inputs, float* out) {
  const size_t size = inputs[0].bytes.size() / sizeof(float);
  std::vector<float> x(inputs[0].f32(), inputs[0].f32() + size), x_next(size), d(size), denoised(size);
  std::vector<TensorView> views;
  for (const Array& a : inputs) views.push_back({a.bytes.data(), a.dtype, a.shape});
  float* sigma_in = inputs[1].f32();
  auto denoise = [&](const std::vector<float>& state, float sigma) {
    std::fill(sigma_in, sigma_in + inputs[1].numel(), sigma);
    views[0].data = state.data();
    backend_->run(views, denoised.data());
  };
  for (size_t i = 0; i + 1 < sigmas_.size(); ++i) {
    const float s = static_cast<float>(sigmas_[i]), s_next = static_cast<float>(sigmas_[i + 1]), h = s_next - s;
    denoise(x, s);
    for (size_t k = 0; k < size; ++k) d[k] = (x[k] - denoised[k]) / s, x_next[k] = x[k] + h * d[k];
    if (heun_ && s_next > 0) {
      denoise(x_next, s_next);
      for (size_t k = 0; k < size; ++k) x_next[k] = x[k] + h * (0.5f * (d[k] + (x_next[k] - denoised[k]) / s_next));
    }
    if (!std::all_of(x_next.begin(), x_next.end(), [](float v) { return std::isfinite(v); }))
      throw Error("sampling produced NaN/Inf at step " + std::to_string(i) + " (sigma " + std::to_string(s) + " -> " +
                  std::to_string(s_next) + ")");
    x.swap(x_next);
  }
  std::memcpy(out, x.data(), size * sizeof(float));
}

}  // namespace diffexport
