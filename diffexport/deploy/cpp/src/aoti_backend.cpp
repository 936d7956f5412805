// The AOTInductor backend: runs `denoiser.pt2` with libtorch's AOTIModelPackageLoader.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstring>

#include "diffexport/engine.h"

namespace diffexport {
namespace {

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

class AotiBackend : public Backend {
 public:
  AotiBackend(const Engine& engine, int threads) : file_(engine.verified_artifact("aoti")) {
    const Field art = Field(engine.manifest, "").at("artifacts").at("aoti");
    const std::string device = art.has("device") ? art.at("device").str() : "cpu";
    try {
      device_ = c10::Device(device);
    } catch (const std::exception&) {
      throw Error(engine.dir + "/manifest.json: artifacts.aoti.device: unknown device '" + device + "'");
    }
    if (threads > 0) at::set_num_threads(threads);  // the package's kernels share libtorch's OpenMP pool
    try {
      loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(file_);
    } catch (const std::exception& e) {
      throw Error(file_ + ": cannot load the AOTInductor package: " + first_line(e.what()));
    }
  }

  std::string name() const override { return "aoti"; }

  void run(const std::vector<TensorView>& inputs, float* denoised) override {
    std::vector<at::Tensor> args;
    for (const TensorView& v : inputs) {
      auto dtype = v.dtype == DType::Float32 ? at::kFloat : at::kLong;
      args.push_back(at::from_blob(const_cast<void*>(v.data), v.shape, at::TensorOptions().dtype(dtype)).to(device_));
    }
    std::vector<at::Tensor> out;
    try {
      c10::InferenceMode guard;
      out = loader_->run(args);
    } catch (const std::exception& e) {
      throw Error(file_ + ": run failed: " + first_line(e.what()));
    }
    if (out.empty() || out[0].sizes() != at::IntArrayRef(inputs[0].shape) || out[0].scalar_type() != at::kFloat)
      throw Error(file_ + ": output 'denoised' should be float32 " + shape_str(inputs[0].shape));
    at::Tensor d = out[0].to(at::kCPU).contiguous();
    std::memcpy(denoised, d.data_ptr<float>(), d.numel() * sizeof(float));
  }

 private:
  std::string file_;
  c10::Device device_ = at::kCPU;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
};

}  // namespace

std::unique_ptr<Backend> open_aoti(const Engine& engine, int threads) { return std::make_unique<AotiBackend>(engine, threads); }

}  // namespace diffexport
