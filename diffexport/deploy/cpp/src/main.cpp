// diffexport-sample: run an engine's sampler on latents from a .npy file (or drawn from --seed),
// write the samples. Options are parsed by CLI11.
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include "diffexport/runtime.h"

namespace {

struct Args {
  std::string engine, latents, out;
  int64_t batch = 0;
  bool overwrite = false;
  std::vector<std::string> conditions;  // NAME=FILE.npy
  diffexport::SamplerOptions options;
};

/// `diffexport sample --seed`'s range, 0..2^63-1 (torch.Generator.manual_seed): "-1" is refused, not wrapped around.
const CLI::Validator kSeedRange(
    [](std::string& s) -> std::string {
      const std::string range = "must be an integer in 0..9223372036854775807, got '" + s + "'";
      if (s.empty() || s.size() > 19 || s.find_first_not_of("0123456789") != std::string::npos) return range;
      return std::stoull(s) > static_cast<unsigned long long>(INT64_MAX) ? range : "";
    },
    "0..2^63-1");

void describe(CLI::App& app, Args& a) {
  app.description(
      "Samples with the engine's denoiser and the sampler its manifest records (manifest.json).\n"
      "IN.npy holds the initial latents x_N, float32 [N, C, H, W]: unit noise already scaled by the\n"
      "first noise level (sigma_max; unscaled for DDPM). Without --latents, --batch N latents are drawn\n"
      "from --seed as `diffexport sample --seed S --batch N` draws them.");
  app.add_option("--engine", a.engine, "engine directory (manifest.json)")->required()->type_name("DIR");
  app.add_option("--latents", a.latents, "initial latents .npy")->type_name("IN.npy");
  app.add_option("--batch", a.batch, "draw N latents from --seed instead of --latents")->type_name("N")->check(CLI::Range(1, 1000000));
  app.add_option("--out", a.out, "samples .npy (written atomically; an existing file only with --overwrite)")->required()->type_name("OUT.npy");
  app.add_flag("--overwrite", a.overwrite, "replace an existing --out file");
  app.add_option("--condition", a.conditions, "a condition input (repeatable)")->type_name("NAME=FILE.npy")->allow_extra_args(false);
  app.add_option("--steps", a.options.steps, "re-discretise the schedule with K steps")->type_name("K")->check(CLI::Range(1, 1000000));
  app.add_option("--seed", a.options.seed, "seeds the latents and the stochastic solvers' noise (default 0)")->type_name("S")->check(kSeedRange);
  app.add_option("--threads", a.options.threads, "CPU threads")->type_name("N")->check(CLI::Range(1, 4096));
  app.add_option("--backend", a.options.backend, "denoiser backend")->check(CLI::IsMember({"auto", "aoti", "tensorrt"}))->type_name("auto|aoti|tensorrt");
  app.add_flag("--allow-unverified", a.options.allow_unverified, "run an engine whose parity status is not ok (debugging only)");
  app.get_formatter()->column_width(34);
}

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

/// Before any work, as `diffexport sample`: nothing existing is replaced without --overwrite, never a folder or a symlink.
void check_out(const std::string& out, bool overwrite) {
  namespace fs = std::filesystem;
  const fs::file_status status = fs::symlink_status(out);
  if (fs::is_directory(status) || fs::is_symlink(status))
    throw diffexport::Error("--out " + out + ": is a " + (fs::is_directory(status) ? "folder" : "symlink") + "; refusing to replace it");
  if (fs::exists(status) && !overwrite)
    throw diffexport::Error("--out " + out + ": already exists; pass --overwrite to replace it, or choose another --out");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"", "diffexport-sample"};
  Args args;
  describe(app, args);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "diffexport-sample: error: %s (see --help)\n", first_line(e.what()).c_str());
    return 1;
  }
  try {
    if (args.latents.empty() == (args.batch == 0)) throw diffexport::Error("give exactly one of --latents IN.npy and --batch N (see --help)");
    check_out(args.out, args.overwrite);
    diffexport::Sampler sampler(args.engine, args.options);
    diffexport::Conditions conditions;
    for (const std::string& c : args.conditions) {
      const size_t eq = c.find('=');
      if (eq == 0 || eq == std::string::npos || eq + 1 == c.size()) throw diffexport::Error("--condition: expected NAME=FILE.npy, got '" + c + "'");
      if (!conditions.emplace(c.substr(0, eq), diffexport::read_npy(c.substr(eq + 1))).second)
        throw diffexport::Error("--condition " + c.substr(0, eq) + " given twice");
    }
    const auto start = std::chrono::steady_clock::now();
    const diffexport::Array samples =
        args.latents.empty() ? sampler.sample(args.batch, conditions) : sampler.sample(diffexport::read_npy(args.latents), conditions);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    diffexport::write_npy(args.out, samples);
    std::fprintf(stderr, "diffexport-sample: %s: %lld samples, %s, %s, %d steps, %d evaluations per batch, %.3f s (%s backend)\n",
                 sampler.engine().name.c_str(), static_cast<long long>(samples.shape[0]), sampler.engine().sampler.scheduler.c_str(),
                 sampler.engine().sampler.solver.c_str(), sampler.steps(), sampler.evaluations(), seconds, sampler.backend().name().c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "diffexport-sample: error: %s\n", first_line(e.what()).c_str());
    return 1;
  }
}
