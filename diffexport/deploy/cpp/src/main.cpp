// diffexport-sample: run an engine's sampler on latents from a .npy file, write the samples.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>

#include "diffexport/runtime.h"

namespace {

const char* kUsage =
    "usage: diffexport-sample --engine ENGINE_DIR --latents IN.npy --out OUT.npy\n"
    "                         [--condition NAME=FILE.npy ...] [--steps K] [--threads N] [--backend auto|aoti|tensorrt]\n"
    "Samples with the engine's denoiser and sampler (manifest.json). IN.npy holds the initial\n"
    "latents x_N, float32 [N, C, H, W]: unit noise already scaled by the first sigma (sigma_max).\n";

struct Args {
  std::string engine, latents, out;
  std::vector<std::pair<std::string, std::string>> conditions;  // name, file
  diffexport::SamplerOptions options;
};

int to_int(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  long n = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end || n < 1 || n > 1000000) throw diffexport::Error(flag + ": expected a positive integer, got '" + v + "'");
  return static_cast<int>(n);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") std::cout << kUsage, std::exit(0);
    if (i + 1 >= argc) throw diffexport::Error(flag + ": unknown option or missing value (see --help)");
    const std::string v = argv[++i];
    if (flag == "--engine") a.engine = v;
    else if (flag == "--latents") a.latents = v;
    else if (flag == "--out") a.out = v;
    else if (flag == "--steps") a.options.steps = to_int(flag, v);
    else if (flag == "--threads") a.options.threads = to_int(flag, v);
    else if (flag == "--backend") a.options.backend = v;
    else if (flag == "--condition") {
      const size_t eq = v.find('=');
      if (eq == 0 || eq == std::string::npos || eq + 1 == v.size()) throw diffexport::Error("--condition: expected NAME=FILE.npy, got '" + v + "'");
      a.conditions.emplace_back(v.substr(0, eq), v.substr(eq + 1));
    } else {
      throw diffexport::Error("unknown option " + flag + " (see --help)");
    }
  }
  for (auto [flag, value] : {std::pair<const char*, std::string*>{"--engine", &a.engine}, {"--latents", &a.latents}, {"--out", &a.out}})
    if (value->empty()) throw diffexport::Error(std::string(flag) + " is required (see --help)");
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args args = parse(argc, argv);
    diffexport::Sampler sampler(args.engine, args.options);
    const diffexport::Array latents = diffexport::read_npy(args.latents);
    diffexport::Conditions conditions;
    for (const auto& [name, file] : args.conditions)
      if (!conditions.emplace(name, diffexport::read_npy(file)).second) throw diffexport::Error("--condition " + name + " given twice");
    const auto start = std::chrono::steady_clock::now();
    const diffexport::Array samples = sampler.sample(latents, conditions);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    diffexport::write_npy(args.out, samples);
    std::fprintf(stderr, "diffexport-sample: %s: %lld samples, %s, %zu steps, %d evaluations per batch, %.3f s (%s backend)\n",
                 sampler.engine().name.c_str(), static_cast<long long>(latents.shape[0]), sampler.engine().sampler.solver.c_str(),
                 sampler.sigmas().size() - 1, sampler.evaluations(), seconds, sampler.backend().name().c_str());
    return 0;
  } catch (const std::exception& e) {
    std::string msg = e.what();
    std::fprintf(stderr, "diffexport-sample: error: %s\n", msg.substr(0, msg.find('\n')).c_str());
    return 1;
  }
}
