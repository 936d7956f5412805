// The manifest's sampler, step for step as diffexport/diffusion/samplers.py computes it, in ATen
// ops (the same kernels as the Python runtime): noise schedulers, ODE right-hand side, solvers.
// As there (and EDM's generate.py), the state, times and slopes are float64; the engine gets float32.
#include "diffexport/sampler.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>

#include "diffexport/verdict.h"

namespace diffexport {

using at::Tensor;

namespace {

/// `batch_view`: v [B] -> (B, 1, ..., 1) to broadcast against x.
Tensor bv(const Tensor& v, const Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[0] = -1;
  return v.reshape(shape);
}

Tensor ramp(int n) { return at::arange(n, at::kDouble) / static_cast<double>(std::max(n - 1, 1)); }

/// `a + ramp(n) (b - a)` (float64), exactly `b` at the end (as Python's `_lerp`: the plain formula cancels to 0 when a >> b).
Tensor lerp(double a, double b, int n) {
  const Tensor r = ramp(n);
  return at::lerp(at::full_like(r, a), at::full_like(r, b), r);
}

/// `v` as Python's `{v:g}` writes it (6 significant digits).
std::string num_str(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

Tensor append_zero(const Tensor& t) { return at::cat({t, at::zeros({1}, t.options())}); }

/// A JSON number, or the strings "inf" / "-inf" / "nan" that strict-JSON manifests use for them.
bool json_number(const Json& j, double& out) {
  if (j.is_number()) return out = j.get<double>(), true;
  if (!j.is_string()) return false;
  const std::string v = j.get<std::string>();
  if (v == "inf" || v == "Infinity") return out = INFINITY, true;
  if (v == "-inf" || v == "-Infinity") return out = -INFINITY, true;
  if (v == "nan" || v == "NaN") return out = NAN, true;
  return false;
}

/// Scheduler arguments: the manifest's resolved values, Python's defaults for the ones left out.
class Args {
 public:
  Args(const Json& args, std::string where, std::set<std::string> known) : args_(args), where_(std::move(where)) {
    for (auto it = args.begin(); it != args.end(); ++it)
      if (!known.count(it.key())) {
        std::string names;
        for (const auto& k : known) names += (names.empty() ? "" : ", ") + k;
        throw Error(where_ + it.key() + ": unknown argument (expected " + names + ")");
      }
  }
  double num(const char* key, double fallback) const {
    auto it = args_.find(key);
    if (it == args_.end() || it->is_null()) return fallback;
    double v = 0;
    if (!json_number(*it, v)) throw Error(where_ + key + ": expected a number, got " + it->dump());
    return v;
  }

 private:
  const Json& args_;
  std::string where_;
};

}  // namespace

/// The formulas of one noise scheduler (diffexport/diffusion/noise_schedulers.py): x_t = α(t) x0 + σ(t) ε.
class Schedule {
 public:
  virtual ~Schedule() = default;
  virtual bool discrete() const { return false; }  ///< DDPMScheduler: integer times, DDIM steps
  virtual Tensor alpha(const Tensor& t) const = 0;
  virtual Tensor sigma(const Tensor& t) const = 0;
  virtual Tensor alpha_dot(const Tensor& t) const = 0;
  virtual Tensor sigma_dot(const Tensor& t) const = 0;
  virtual Tensor sigma_inv(const Tensor& s) const = 0;
  virtual Tensor edm_sigma(const Tensor& t) const { return sigma(t) / alpha(t); }
  virtual Tensor edm_sigma_inv(const Tensor& s) const { return sigma_inv(s); }
  virtual Tensor timesteps(int n) const = 0;  ///< [n + 1]: float64 (int64 when discrete)
  virtual Tensor alpha_bar(const Tensor&) const { throw Error("alpha_bar: only for DDPMScheduler"); }
};

namespace {

class VarianceExploding : public Schedule {  // α = 1, σ(t) = t (EDM, iDDPM)
 public:
  Tensor alpha(const Tensor& t) const override { return at::ones_like(t); }
  Tensor alpha_dot(const Tensor& t) const override { return at::zeros_like(t); }
  Tensor sigma(const Tensor& t) const override { return t; }
  Tensor sigma_inv(const Tensor& s) const override { return s; }
  Tensor sigma_dot(const Tensor& t) const override { return at::ones_like(t); }
};

class EDM : public VarianceExploding {
 public:
  explicit EDM(const Args& a) : smin_(a.num("sigma_min", 0.002)), smax_(a.num("sigma_max", 80.0)), rho_(a.num("rho", 7.0)) {}
  Tensor timesteps(int n) const override {
    const double a = std::pow(smax_, 1 / rho_), b = std::pow(smin_, 1 / rho_);
    return append_zero(at::pow(lerp(a, b, n), rho_));
  }

 private:
  double smin_, smax_, rho_;
};

/// `iddpm_sigma_table`: the iDDPM noise levels u_0 > u_1 > ... > u_M = 0 (EDM paper, Table 1).
std::vector<double> iddpm_table(double C_1, double C_2, int M) {
  std::vector<double> abar(M + 1), u(M + 1, 0.0);
  for (int j = 0; j <= M; ++j) abar[j] = std::pow(std::sin(0.5 * M_PI * j / M / (C_2 + 1)), 2);
  for (int j = M; j > 0; --j) u[j - 1] = std::sqrt((std::pow(u[j], 2) + 1) / std::max(abar[j - 1] / abar[j], C_1) - 1);
  return u;
}

class IDDPM : public VarianceExploding {
 public:
  explicit IDDPM(const Args& a) {
    const double smin = a.num("sigma_min", 0.002), smax = a.num("sigma_max", 81.0), C_1 = a.num("C_1", 0.001), C_2 = a.num("C_2", 0.008);
    const int M = static_cast<int>(a.num("M", 1000));
    smin_ = smin, smax_ = smax, M_ = M;
    std::vector<double> kept;
    for (double v : iddpm_table(C_1, C_2, M))
      if (v >= smin && v <= smax) kept.push_back(v);
    u_ = at::tensor(kept, at::kDouble);
  }
  Tensor timesteps(int n) const override {
    if (n > u_.size(0))  // more steps than levels would repeat some (IDDPMNoiseScheduler.timesteps refuses the same)
      throw Error("num_steps must be <= " + std::to_string(u_.size(0)) + ": the iDDPM table of M = " + std::to_string(M_) + " has " +
                  std::to_string(u_.size(0)) + " levels between sigma_min = " + num_str(smin_) + " and sigma_max = " + num_str(smax_) +
                  ", got " + std::to_string(n));
    const Tensor idx = (ramp(n) * (u_.size(0) - 1)).round().to(at::kLong);
    return append_zero(u_.index({idx}));
  }

 private:
  Tensor u_;
  double smin_ = 0, smax_ = 0;
  int M_ = 0;
};

class VE : public Schedule {  // t = σ²
 public:
  explicit VE(const Args& a) : smin_(a.num("sigma_min", 0.02)), smax_(a.num("sigma_max", 100.0)) {}
  Tensor alpha(const Tensor& t) const override { return at::ones_like(t); }
  Tensor alpha_dot(const Tensor& t) const override { return at::zeros_like(t); }
  Tensor sigma(const Tensor& t) const override { return t.sqrt(); }
  Tensor sigma_inv(const Tensor& s) const override { return at::pow(s, 2); }
  Tensor sigma_dot(const Tensor& t) const override { return t.sqrt().reciprocal() * 0.5; }
  Tensor timesteps(int n) const override {
    const double ratio = smin_ * smin_ / (smax_ * smax_);
    return append_zero(at::pow(ratio, ramp(n)) * (smax_ * smax_));
  }

 private:
  double smin_, smax_;
};

class VP : public Schedule {
 public:
  explicit VP(const Args& a)
      : bmin_(a.num("beta_min", 0.1)), bd_(a.num("beta_d", 19.9)), eps_(a.num("epsilon_s", 1e-3)), tmax_(a.num("t_max", 1.0)) {}
  Tensor alpha(const Tensor& t) const override { return (a_(t) * -0.5).exp(); }
  Tensor alpha_dot(const Tensor& t) const override { return (t * bd_ + bmin_) * -0.5 * alpha(t); }
  Tensor sigma(const Tensor& t) const override { return (-at::expm1(-a_(t))).sqrt(); }
  Tensor sigma_inv(const Tensor& s) const override { return t_of_a(-at::log1p(-at::pow(s, 2))); }
  Tensor sigma_dot(const Tensor& t) const override { return (t * bd_ + bmin_) * 0.5 * at::pow(alpha(t), 2) / sigma(t); }
  Tensor edm_sigma(const Tensor& t) const override { return at::expm1(a_(t)).sqrt(); }
  Tensor edm_sigma_inv(const Tensor& s) const override { return t_of_a(at::log1p(at::pow(s, 2))); }
  Tensor timesteps(int n) const override { return append_zero(lerp(tmax_, eps_, n)); }

 private:
  Tensor a_(const Tensor& t) const { return at::pow(t, 2) * (0.5 * bd_) + t * bmin_; }
  Tensor t_of_a(const Tensor& a) const { return a * 2 / ((a * (2 * bd_) + bmin_ * bmin_).sqrt() + bmin_); }
  double bmin_, bd_, eps_, tmax_;
};

class DDPM : public Schedule {  // discrete: abar indexed by t + 1, t = -1 is clean data
 public:
  explicit DDPM(const Args& a) : T_(static_cast<int64_t>(a.num("num_train_timesteps", 1000))) {
    const Tensor betas = at::linspace(a.num("beta_start", 1e-4), a.num("beta_end", 0.02), T_, at::kDouble);
    abar_ = at::cat({at::ones({1}, at::kDouble), at::cumprod(1 - betas, 0)});
  }
  bool discrete() const override { return true; }
  Tensor alpha_bar(const Tensor& t) const override { return abar_.index({t.to(at::kLong) + 1}); }
  Tensor alpha(const Tensor& t) const override { return alpha_bar(t).sqrt(); }
  Tensor sigma(const Tensor& t) const override { return (1 - alpha_bar(t)).sqrt(); }
  Tensor alpha_dot(const Tensor&) const override { throw Error("DDPMScheduler is discrete"); }
  Tensor sigma_dot(const Tensor&) const override { throw Error("DDPMScheduler is discrete"); }
  Tensor sigma_inv(const Tensor&) const override { throw Error("DDPMScheduler is discrete"); }
  Tensor edm_sigma_inv(const Tensor&) const override { throw Error("DDPMScheduler is discrete"); }
  Tensor timesteps(int n) const override {
    if (n > T_) throw Error("num_steps must be <= num_train_timesteps=" + std::to_string(T_) + ", got " + std::to_string(n));
    const Tensor t = at::linspace(static_cast<double>(T_ - 1), 0.0, n, at::kDouble).round().to(at::kLong);
    return at::cat({t, at::full({1}, -1, at::kLong)});
  }

 private:
  int64_t T_;
  Tensor abar_;
};

std::shared_ptr<const Schedule> make_schedule(const SamplerSpec& s, const std::string& where) {
  const std::string w = where + "scheduler.args.";
  const Json& a = s.scheduler_args;
  if (s.scheduler == "EDMNoiseScheduler")
    return std::make_shared<EDM>(Args(a, w, {"sigma_min", "sigma_max", "rho", "sigma_data", "P_mean", "P_std"}));
  if (s.scheduler == "VENoiseScheduler") return std::make_shared<VE>(Args(a, w, {"sigma_min", "sigma_max"}));
  if (s.scheduler == "VPNoiseScheduler") return std::make_shared<VP>(Args(a, w, {"beta_min", "beta_d", "epsilon_s", "t_max"}));
  if (s.scheduler == "IDDPMNoiseScheduler") return std::make_shared<IDDPM>(Args(a, w, {"sigma_min", "sigma_max", "C_1", "C_2", "M"}));
  if (s.scheduler == "DDPMScheduler") return std::make_shared<DDPM>(Args(a, w, {"num_train_timesteps", "beta_start", "beta_end"}));
  throw Error(where + "scheduler.class: '" + s.scheduler +
              "' is not supported by the C++ runner (EDMNoiseScheduler, VENoiseScheduler, VPNoiseScheduler, IDDPMNoiseScheduler, DDPMScheduler)");
}

/// `sampler.round_sigma` -> the positive noise levels of the preconditioner (`IDDPMPreconditioner.sigma_levels`)
/// that churned levels are rounded to; empty when the manifest has none (a continuous preconditioner).
std::vector<double> round_sigma_levels(const Field& sampler, const std::string& where) {
  if (!sampler.has("round_sigma")) return {};
  const Field spec = sampler.at("round_sigma");
  const std::string cls = spec.at("class").str();
  if (cls != "IDDPMPreconditioner")
    throw Error(where + "round_sigma.class: '" + cls + "' is not supported by the C++ runner (IDDPMPreconditioner)");
  const Json& json = spec.has("args") ? spec.at("args").json() : Json::object();
  const Args a(json, where + "round_sigma.args.", {"C_1", "C_2", "M"});
  std::vector<double> levels;
  for (double v : iddpm_table(a.num("C_1", 0.001), a.num("C_2", 0.008), static_cast<int>(a.num("M", 1000))))
    if (v > 0) levels.push_back(v);
  return levels;
}

/// EDM's t_steps = σ⁻¹(round_sigma(σ(t))) (`samplers.round_time_steps`): the time steps at the preconditioner's
/// noise ``levels`` (nearest, compared in float64), the final entry kept.
Tensor round_time_steps(const Schedule& schedule, const Tensor& t, const std::vector<double>& levels) {
  const Tensor lv = at::tensor(levels, at::kDouble);
  const int64_t n = t.size(0) - 1;
  const Tensor s = schedule.edm_sigma(t.slice(0, 0, n));
  const Tensor index = (s.reshape({-1, 1}) - lv.reshape({1, -1})).abs().argmin(1);
  return at::cat({schedule.edm_sigma_inv(lv.index({index})), t.slice(0, n)});
}

/// The solver and its options (samplers.py signatures), checked against what the manifest gives.
struct SolverSpec {
  std::string name;
  double heun_alpha = 1.0, S_churn = 0, S_min = 0, S_max = INFINITY, S_noise = 1, eta = 0;
  int churn_steps = 0;  // the stochastic solvers' num_steps (default: the schedule's)
  bool has_seed = false;
  uint64_t seed = 0;  // solver_options.generator: an int seed of the solver's own
  bool heun() const { return name == "heun" || name == "edm_stochastic_heun"; }
  bool churn() const { return name.rfind("edm_stochastic_", 0) == 0; }
  double gamma(int steps) const { return std::min(S_churn / (churn_steps > 0 ? churn_steps : steps), std::sqrt(2.0) - 1); }
};

SolverSpec solver_spec(const SamplerSpec& s, const Schedule& schedule, const std::string& where) {
  static const std::map<std::string, std::set<std::string>> options = {
      {"euler", {}},
      {"heun", {"alpha"}},
      {"edm_stochastic_euler", {"S_churn", "S_min", "S_max", "S_noise", "num_steps", "generator"}},
      {"edm_stochastic_heun", {"S_churn", "S_min", "S_max", "S_noise", "num_steps", "generator", "alpha"}},
      {"ddim", {"eta", "generator"}},
  };
  auto known = options.find(s.solver);
  if (known == options.end())
    throw Error(where + "solver: '" + s.solver + "' is not supported by the C++ runner (ddim, edm_stochastic_euler, edm_stochastic_heun, euler, heun)");
  if ((s.solver == "ddim") != schedule.discrete())
    throw Error(where + "solver: '" + s.solver + "' does not fit " + s.scheduler + " (" +
                (schedule.discrete() ? "ddim" : "euler, heun, edm_stochastic_euler, edm_stochastic_heun") + ")");
  SolverSpec out{s.solver};
  for (auto it = s.solver_options.begin(); it != s.solver_options.end(); ++it) {
    const std::string& key = it.key();
    const std::string at = where + "solver_options." + key;
    if (!known->second.count(key)) {
      std::string names;
      for (const auto& k : known->second) names += (names.empty() ? "" : ", ") + k;
      throw Error(at + ": not an option of solver '" + s.solver + "' (" + (names.empty() ? "none" : names) + ")");
    }
    if (key == "generator") {
      if (it->is_null()) continue;
      if (!it->is_number_integer() || it->get<int64_t>() < 0) throw Error(at + ": expected a non-negative integer seed, got " + it->dump());
      out.has_seed = true, out.seed = it->get<uint64_t>();
      continue;
    }
    double v = 0;
    if (!json_number(*it, v)) throw Error(at + ": expected a number, got " + it->dump());
    if (key == "alpha") out.heun_alpha = v;
    if (key == "S_churn") out.S_churn = v;
    if (key == "S_min") out.S_min = v;
    if (key == "S_max") out.S_max = v;
    if (key == "S_noise") out.S_noise = v;
    if (key == "eta") out.eta = v;
    if (key == "num_steps") {
      if (v < 1 || v != std::floor(v)) throw Error(at + ": expected an integer >= 1, got " + it->dump());
      out.churn_steps = static_cast<int>(v);
    }
  }
  if (!(out.heun_alpha > 0 && out.heun_alpha <= 1)) throw Error(where + "solver_options.alpha: must be in (0, 1], got " + std::to_string(out.heun_alpha));
  if (out.S_churn < 0) throw Error(where + "solver_options.S_churn: must be >= 0, got " + std::to_string(out.S_churn));
  return out;
}

Tensor to_tensor(const Array& a) {
  const auto dtype = a.dtype == DType::Float32 ? at::kFloat : at::kLong;
  return at::from_blob(const_cast<uint8_t*>(a.bytes.data()), a.shape, at::TensorOptions().dtype(dtype)).clone();
}

Array to_array(const Tensor& t) {
  const Tensor c = t.to(at::kFloat).contiguous();
  Array out(DType::Float32, c.sizes().vec());
  std::memcpy(out.bytes.data(), c.data_ptr<float>(), out.bytes.size());
  return out;
}

/// One sampling run: the engine as x0-predictor, the ODE right-hand side, the solver steps.
class Run {
 public:
  Run(const Engine& e, Backend& backend, const Schedule& sch, const SolverSpec& solver, std::vector<Tensor> conditions, uint64_t seed,
      double guidance, const std::vector<double>& levels)
      : e_(e), backend_(backend), sch_(sch), solver_(solver), conditions_(std::move(conditions)), guidance_(guidance),
        gen_(at::make_generator<at::CPUGeneratorImpl>(solver.has_seed ? solver.seed : seed)) {
    if (!levels.empty()) levels_ = at::tensor(levels, at::kDouble);
    if (guidance_ != 1)  // classifier-free guidance: conditional rows, then unconditional ones (vector conditions zeroed)
      for (size_t i = 0; i < conditions_.size(); ++i)
        joint_.push_back(at::cat({conditions_[i], e.inputs[i + 2].kind == "vector" ? at::zeros_like(conditions_[i]) : conditions_[i]}));
  }

  /// `initial_latents`: σ(t_0)·ε (ε alone for DDPM), drawn first from the generator.
  Tensor latents(const std::vector<int64_t>& shape, const Tensor& t0) {
    const Tensor eps = at::randn(shape, gen_, at::TensorOptions().dtype(at::kFloat));
    if (sch_.discrete()) return eps;
    return sch_.sigma(bv(t0.expand({shape[0]}), eps)).to(at::kFloat) * eps;
  }

  Tensor sample(Tensor x, const Tensor& times) {
    const int64_t n = times.size(0) - 1, B = x.size(0);
    const double gamma = solver_.churn() ? solver_.gamma(static_cast<int>(n)) : 0.0;
    for (int64_t i = 0; i < n; ++i) {
      Tensor t_cur = times[i].repeat({B}), t_next = times[i + 1].repeat({B});
      if (solver_.name == "ddim") {
        x = ddim(x, t_cur, t_next);
      } else {
        if (gamma > 0) std::tie(x, t_cur) = churn(x, t_cur, gamma);
        x = solver_.heun() ? heun(x, t_cur, t_next) : x + bv(t_next - t_cur, x) * ode(x, t_cur);
      }
      if (!at::isfinite(x).all().item<bool>())
        throw Error(backend_.name() + ": non-finite values in the state x after step " + std::to_string(i) + " (t " + g(times[i].item<double>()) +
                    " -> " + g(times[i + 1].item<double>()) + "); " + non_finite(x));
      step_ = static_cast<int>(i) + 1;
    }
    return x;
  }

 private:
  /// The engine D(x, σ, conditions...) on any batch: chunks of at most batch.max rows, the last
  /// padded to batch.min by repeating its last row (runtime/batching.py).
  Tensor engine(const Tensor& x, const Tensor& sigma, const std::vector<Tensor>& conditions) {
    const int64_t n = x.size(0);
    std::vector<Tensor> outs;
    for (int64_t start = 0; start < n; start += e_.batch_max) {
      const int64_t size = std::min(e_.batch_max, n - start);
      std::vector<Tensor> part{x.slice(0, start, start + size), sigma.slice(0, start, start + size)};
      for (const Tensor& c : conditions) part.push_back(c.slice(0, start, start + size));
      for (Tensor& p : part) {
        if (size < e_.batch_min) {
          std::vector<int64_t> reps(p.dim(), 1);
          reps[0] = e_.batch_min - size;
          p = at::cat({p, p.slice(0, size - 1, size).repeat(reps)});
        }
        p = p.contiguous();
      }
      std::vector<TensorView> views;
      for (const Tensor& p : part) views.push_back({p.data_ptr(), p.scalar_type() == at::kFloat ? DType::Float32 : DType::Int64, p.sizes().vec()});
      Tensor out = at::empty(part[0].sizes(), at::kFloat);
      backend_.run(views, out.data_ptr<float>());
      outs.push_back(out.slice(0, 0, size));
    }
    const Tensor out = outs.size() == 1 ? outs[0] : at::cat(outs);
    if (!at::isfinite(out).all().item<bool>()) {  // runtime.guards.FiniteGuard's check and line
      const double lo = sigma.min().item<double>(), hi = sigma.max().item<double>();
      throw Error(backend_.name() + ": non-finite values in the denoiser output at step " + std::to_string(step_) + " (sigma=" +
                  (lo == hi ? g(lo) : g(lo) + ".." + g(hi)) + "); " + non_finite(out));
    }
    return out;
  }

  /// Python's f"{v:g}".
  static std::string g(double v) {
    char text[32];
    std::snprintf(text, sizeof text, "%g", v);
    return text;
  }

  /// "3 of 512 values are NaN/Inf (1 NaN)", as runtime.guards counts them.
  static std::string non_finite(const Tensor& t) {
    return std::to_string((~at::isfinite(t)).sum().item<int64_t>()) + " of " + std::to_string(t.numel()) + " values are NaN/Inf (" +
           std::to_string(at::isnan(t).sum().item<int64_t>()) + " NaN)";
  }

  /// `edm_x0_predictor(denoiser_dtype=float32)`: x0 = D(x_t / α(t), σ(t)/α(t)), computed in the state's
  /// float64, the engine's input cast to float32 and its output back; with guidance `JointClassifierFreeGuidance`:
  /// one call on [x; x] with [cond; uncond], then uncond + cfg·(cond − uncond).
  Tensor x0(const Tensor& x, const Tensor& t) {
    auto predict = [&](const Tensor& xs, const Tensor& ts, const std::vector<Tensor>& conditions) {
      const Tensor alpha = bv(sch_.alpha(ts), xs).to(xs.scalar_type());
      const Tensor sigma = sch_.edm_sigma(ts).to(xs.scalar_type());
      return engine((xs / alpha).to(at::kFloat), sigma.to(at::kFloat), conditions).to(xs.scalar_type());
    };
    if (guidance_ == 1) return predict(x, t, conditions_);
    const std::vector<Tensor> both = predict(at::cat({x, x}), at::cat({t, t}), joint_).chunk(2);
    return both[1] + (both[0] - both[1]) * guidance_;
  }

  /// `LinearGaussianNoiseScheduler.get_denoiser(x0_predictor=...)`, ODE: f − ½ g² score.
  Tensor ode(const Tensor& x, const Tensor& t) {
    const Tensor tb = bv(t, x);
    const Tensor drift = (sch_.alpha_dot(tb) / sch_.alpha(tb)).to(x.scalar_type()) * x;
    const Tensor s = sch_.sigma(tb);
    const Tensor g2 = (sch_.sigma_dot(tb) * 2 * s - sch_.alpha_dot(tb) * 2 / sch_.alpha(tb) * at::pow(s, 2)).to(x.scalar_type());
    const Tensor p = x0(x, t);
    const Tensor a = sch_.alpha(tb).to(x.scalar_type()), sx = s.to(x.scalar_type());
    const Tensor score = (a * p - x) / at::pow(sx, 2);
    return drift - g2 * 0.5 * score;
  }

  Tensor heun(const Tensor& x, const Tensor& t_cur, const Tensor& t_next) {
    const double alpha = solver_.heun_alpha, w = 1 / (2 * alpha);
    const Tensor h = bv(t_next - t_cur, x), d = ode(x, t_cur), x_euler = x + h * d;
    const Tensor last = t_next == 0;
    if (last.all().item<bool>()) return x_euler;
    // lerp is exact at alpha = 1 (t_prime = t_next), as in Python: t_cur + (t_next - t_cur) can round to 0 in float32
    const Tensor t_prime = at::where(last, t_cur, at::lerp(t_cur, t_next, alpha));
    const Tensor d_prime = ode(x + h * alpha * d, t_prime);
    const Tensor x_heun = x + h * (d * (1 - w) + d_prime * w);
    return last.any().item<bool>() ? at::where(bv(last, x), x_euler, x_heun) : x_heun;
  }

  /// EDM churn: raise the noise level s -> s (1 + γ) where S_min <= s <= S_max (rounded to the nearest of the
  /// preconditioner's levels when it has them, EDM's round_sigma), adding fresh noise.
  std::pair<Tensor, Tensor> churn(const Tensor& x, const Tensor& t, double gamma_max) {
    const Tensor s = sch_.edm_sigma(t);
    const Tensor gamma = ((s >= solver_.S_min) & (s <= solver_.S_max)).to(s.scalar_type()) * gamma_max;
    Tensor s_hat = s * (gamma + 1);
    if (levels_.defined()) {  // preconditioners.level_rounding
      const Tensor index = (s_hat.reshape({-1, 1}).to(at::kDouble) - levels_.reshape({1, -1})).abs().argmin(1);
      s_hat = at::where(gamma > 0, levels_.index({index}).reshape(s_hat.sizes()).to(s_hat.scalar_type()), s_hat);
    }
    const Tensor t_hat = at::where(gamma > 0, sch_.edm_sigma_inv(s_hat), t);
    const Tensor a = bv(sch_.alpha(t), x), a_hat = bv(sch_.alpha(t_hat), x);
    const Tensor noise = bv((at::pow(s_hat, 2) - at::pow(s, 2)).clamp_min(0).sqrt() * solver_.S_noise, x) *
                         at::randn(x.sizes(), gen_, x.options());
    return {a_hat / a * x + a_hat * noise, t_hat};
  }

  /// `DDPMScheduler.step` (DDIM(η)) with the epsilon of the x0-predictor.
  Tensor ddim(const Tensor& x, const Tensor& t, const Tensor& t_prev) {
    const auto f = x.scalar_type();
    const Tensor tb = bv(t, x);
    const Tensor a = sch_.alpha(tb).to(f), sg = sch_.sigma(tb).to(f);
    const Tensor eps = (x - a * x0(x, t)) / sg;  // x0_to_epsilon
    const Tensor ab_t = bv(sch_.alpha_bar(t), x), ab_p = bv(sch_.alpha_bar(t_prev), x);
    const Tensor s = ((1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)).sqrt() * solver_.eta;
    const Tensor x0_hat = (x - sg * eps) / a;  // epsilon_to_x0
    const Tensor x_prev = ab_p.sqrt().to(f) * x0_hat + (1 - ab_p - at::pow(s, 2)).clamp_min(0).sqrt().to(f) * eps;
    if (solver_.eta == 0) return x_prev;
    return x_prev + s.to(f) * at::randn(x.sizes(), gen_, x.options());
  }

  const Engine& e_;
  Backend& backend_;
  const Schedule& sch_;
  const SolverSpec& solver_;
  std::vector<Tensor> conditions_, joint_;
  double guidance_;
  at::Generator gen_;
  int step_ = 0;  // the step being taken, named when the engine's output is not finite
  Tensor levels_;  // the preconditioner's noise levels (sampler.round_sigma), undefined: no rounding
};

const std::set<std::string> kSamplerKeys = {"scheduler", "solver", "num_steps", "solver_options", "solver_args", "discrete",
                                            "time_steps", "sigmas", "alphas",    "steps",          "patching",    "guidance",
                                            "clip",      "round_sigma"};

bool close(double a, double b) { return a == b || std::abs(a - b) <= 1e-6 * std::max(1.0, std::max(std::abs(a), std::abs(b))); }

/// The manifest's resolved records (`solver_args`, `discrete`, the `steps` table) must say what this
/// runner computes from the scheduler and solver; a disagreement is refused, never guessed around.
void check_records(const std::string& where, const Field& sampler, const SolverSpec& solver, const Schedule& schedule,
                   const std::vector<double>& times, const std::vector<double>& sigmas, bool own_steps) {
  auto mismatch = [&](const std::string& field, double got, double want) {
    throw Error(where + field + ": " + std::to_string(got) + " does not match " + std::to_string(want) +
                " computed from the scheduler and solver (edited manifest?)");
  };
  if (sampler.has("discrete") && sampler.at("discrete").boolean() != schedule.discrete())
    throw Error(where + "discrete: " + sampler.at("discrete").json().dump() + " does not fit the scheduler");
  if (sampler.has("solver_args")) {
    const std::map<std::string, double> mine = {{"alpha", solver.heun_alpha}, {"S_churn", solver.S_churn}, {"S_min", solver.S_min},
                                                {"S_max", solver.S_max},      {"S_noise", solver.S_noise}, {"eta", solver.eta}};
    for (const auto& [key, value] : sampler.at("solver_args").items()) {
      double v = 0;
      auto it = mine.find(key);
      if (it != mine.end() && json_number(value.json(), v) && !close(v, it->second)) mismatch("solver_args." + key, v, it->second);
    }
  }
  if (!own_steps || !sampler.has("steps")) return;  // the table is for the manifest's own num_steps
  const std::vector<Field> steps = sampler.at("steps").array();
  if (steps.size() + 1 != times.size())
    throw Error(where + "steps: " + std::to_string(steps.size()) + " steps, the time steps make " + std::to_string(times.size() - 1));
  for (size_t i = 0; i < steps.size(); ++i) {
    const std::string at = "steps[" + std::to_string(i) + "]";
    if (!close(steps[i].at("t_cur").number(), times[i])) mismatch(at + ".t_cur", steps[i].at("t_cur").number(), times[i]);
    if (!close(steps[i].at("t_next").number(), times[i + 1])) mismatch(at + ".t_next", steps[i].at("t_next").number(), times[i + 1]);
    const std::vector<Field> evals = steps[i].at("evals").array();
    const size_t want = solver.heun() && times[i + 1] != 0 ? 2 : 1;
    if (evals.size() != want)
      throw Error(where + at + ".evals: " + std::to_string(evals.size()) + " evaluations, solver '" + solver.name + "' makes " + std::to_string(want));
    if (!steps[i].has("churn") && !close(evals[0].at("sigma").number(), sigmas[i])) mismatch(at + ".evals[0].sigma", evals[0].at("sigma").number(), sigmas[i]);
  }
}

}  // namespace

Sampler::Sampler(const std::string& engine_dir, const SamplerOptions& options) : engine_(load_engine(engine_dir)), options_(options) {
  require_verified(engine_dir, engine_.manifest, resolve_backend(engine_, options.backend), options.allow_unverified);
  const std::string where = engine_.dir + "/manifest.json: sampler.";
  const SamplerSpec& s = engine_.sampler;
  if (s.patching)
    throw Error(where + "patching: patch-based sampling (multi-diffusion, global_index) is not supported by the C++ runner; use `diffexport sample`");
  for (auto it = engine_.manifest["sampler"].begin(); it != engine_.manifest["sampler"].end(); ++it)
    if (!kSamplerKeys.count(it.key()) && !it->is_null()) throw Error(where + it.key() + ": not supported by the C++ runner");
  const Field sampler(engine_.manifest["sampler"], "");
  if (sampler.has("guidance")) {
    const Field g = sampler.at("guidance");
    guidance_ = g.has("cfg") ? g.at("cfg").number() : 1.0;
    if (!(guidance_ >= 0)) throw Error(where + "guidance.cfg: must be >= 0, got " + std::to_string(guidance_));
  }
  if (sampler.has("clip")) {  // the data range the final samples are clamped to
    const std::vector<Field> clip = sampler.at("clip").array();
    if (clip.size() != 2 || !(clip[0].number() < clip[1].number())) throw Error(where + "clip: expected [low, high] with low < high");
    clip_ = {clip[0].number(), clip[1].number()};
  }
  schedule_ = make_schedule(s, where);
  levels_ = round_sigma_levels(sampler, where);
  solver_spec(s, *schedule_, where);  // checked here, so that a bad solver fails before the denoiser loads
  Tensor times;
  if (!s.time_steps.empty() && (options.steps <= 0 || options.steps == s.num_steps)) {
    times = at::tensor(s.time_steps, at::kDouble);
    if (s.integer_times) times = times.to(at::kLong);
  } else {
    const int n = options.steps > 0 ? options.steps : s.num_steps;
    if (n < 1) throw Error(where + "num_steps: must be >= 1, got " + std::to_string(n));
    try {
      times = schedule_->timesteps(n).to(at::kDouble);
    } catch (const Error& e) {
      throw Error(where + "scheduler: " + s.scheduler + ": " + e.what());
    }
    if (schedule_->discrete()) times = times.to(at::kLong);
    else if (!levels_.empty()) times = round_time_steps(*schedule_, times, levels_);  // as the build's time_steps
  }
  if (times.size(0) < 2) throw Error(where + "time_steps: expected at least 2 entries");
  const Tensor d = times.to(at::kDouble);
  times_.assign(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
  const Tensor sig = schedule_->edm_sigma(times).to(at::kDouble).contiguous();
  sigmas_.assign(sig.data_ptr<double>(), sig.data_ptr<double>() + sig.numel());
  check_records(where, Field(engine_.manifest, "").at("sampler"), solver_spec(s, *schedule_, where), *schedule_, times_, sigmas_,
                options.steps <= 0 || options.steps == s.num_steps);
  backend_ = open_backend(engine_, options.backend, options.threads);
}

Sampler::~Sampler() = default;

int Sampler::evaluations() const {
  const bool heun = engine_.sampler.solver == "heun" || engine_.sampler.solver == "edm_stochastic_heun";
  int n = 0;
  for (size_t i = 0; i + 1 < times_.size(); ++i) n += heun && times_[i + 1] != 0 ? 2 : 1;
  return guidance_ != 1 ? 2 * n : n;
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
    if (spec.kind == "index") check_index_range(spec, it->second);
  }
  for (const auto& kv : conditions)
    if (std::none_of(engine_.inputs.begin() + 2, engine_.inputs.end(), [&](const TensorSpec& s) { return s.name == kv.first; }))
      throw Error("unknown condition '" + kv.first + "'; the engine takes " + (names.empty() ? "none" : names));
}

Array Sampler::sample(const Array& latents, const Conditions& conditions) { return run(latents, conditions, false); }

Array Sampler::sample(int64_t n, const Conditions& conditions) {
  if (n < 1) throw Error("the number of samples must be >= 1, got " + std::to_string(n));
  std::vector<int64_t> shape = engine_.inputs[0].shape;
  shape[0] = n;
  return run(Array(DType::Float32, shape), conditions, true);
}

Array Sampler::run(const Array& latents, const Conditions& conditions, bool draw_latents) {
  check(latents, conditions);
  const std::string where = engine_.dir + "/manifest.json: sampler.";
  const SolverSpec solver = solver_spec(engine_.sampler, *schedule_, where);
  std::vector<Tensor> conds;
  for (size_t i = 2; i < engine_.inputs.size(); ++i) conds.push_back(to_tensor(conditions.at(engine_.inputs[i].name)));
  Tensor times = at::tensor(times_, at::kDouble);
  if (schedule_->discrete()) times = times.to(at::kLong);
  Run loop(engine_, *backend_, *schedule_, solver, std::move(conds), options_.seed, guidance_, levels_);
  // runtime.sample: float32 latents, a float64 state and times (samplers.sample: the times in x's dtype), float32 samples
  const Tensor x = (draw_latents ? loop.latents(latents.shape, times[0]) : to_tensor(latents)).to(at::kDouble);
  Tensor out = loop.sample(x, times).to(at::kFloat);
  if (!clip_.empty()) out.clamp_(clip_[0], clip_[1]);
  return to_array(out);
}

}  // namespace diffexport
