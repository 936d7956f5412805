// Embedding the diffexport runtime: sample from an engine directory inside your own program.
//
//   embed ENGINE_DIR [N] [THREADS]  ->  samples N images from seed 0, prints per-image statistics
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "diffexport/runtime.h"

int main(int argc, char** argv) {
  if (argc < 2) return std::fprintf(stderr, "usage: embed ENGINE_DIR [N] [THREADS]\n"), 2;
  try {
    diffexport::SamplerOptions options;  // steps, backend, threads, seed; defaults: the manifest's sampler
    options.threads = argc > 3 ? std::atoi(argv[3]) : 0;
    // reads manifest.json, refuses an unverified engine (options.allow_unverified), checks the sha256, loads the denoiser
    diffexport::Sampler sampler(argv[1], options);
    const auto& inputs = sampler.engine().inputs;  // x [-1, C, H, W], sigma [-1], then conditions
    const int64_t n = argc > 2 ? std::atoll(argv[2]) : 2;

    diffexport::Conditions conditions;  // one [N, ...] array per condition input; zeros here
    for (size_t i = 2; i < inputs.size(); ++i) {
      std::vector<int64_t> cshape = inputs[i].shape;
      cshape[0] = n;
      conditions.emplace(inputs[i].name, diffexport::Array(inputs[i].dtype, cshape));
    }

    const diffexport::Array samples = sampler.sample(n, conditions);  // latents drawn from options.seed
    const int64_t per_image = samples.numel() / n;
    for (int64_t k = 0; k < n; ++k) {
      double sum = 0, sq = 0;
      for (int64_t j = 0; j < per_image; ++j) {
        const double v = samples.f32()[k * per_image + j];
        sum += v, sq += v * v;
      }
      const double mean = sum / per_image;
      std::printf("sample %lld: mean %.4f std %.4f\n", static_cast<long long>(k), mean, std::sqrt(sq / per_image - mean * mean));
    }
  } catch (const diffexport::Error& e) {
    return std::fprintf(stderr, "embed: %s\n", e.what()), 1;
  }
  return 0;
}
