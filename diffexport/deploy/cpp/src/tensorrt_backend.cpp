// The TensorRT backend: runs `denoiser.plan` with the TensorRT 10 runtime API.
//
// Compiled only with -DDIFFEXPORT_WITH_TENSORRT=ON, which needs TensorRT 10 and the CUDA
// toolkit. Neither is available on the CPU machines this project is developed and tested on,
// so this file has not been compiled there; the default configure never touches it.
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <fstream>
#include <iostream>
#include <iterator>

#include "diffexport/engine.h"

namespace diffexport {
namespace {

void cuda_check(cudaError_t status, const std::string& what) {
  if (status != cudaSuccess) throw Error("tensorrt: " + what + ": " + cudaGetErrorString(status));
}

class Logger : public nvinfer1::ILogger {
  void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "tensorrt: " << msg << "\n";
  }
};

struct CudaFree {
  void operator()(void* p) const { cudaFree(p); }
};

class TensorRTBackend : public Backend {
 public:
  explicit TensorRTBackend(const Engine& engine) : file_(engine.verified_artifact("tensorrt")), batch_max_(engine.batch_max) {
    std::ifstream in(file_, std::ios::binary);
    const std::vector<char> plan((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) throw Error(file_ + ": cannot create the TensorRT runtime");
    engine_.reset(runtime_->deserializeCudaEngine(plan.data(), plan.size()));
    if (!engine_) throw Error(file_ + ": cannot deserialize the TensorRT plan (built with another TensorRT version or GPU?)");
    context_.reset(engine_->createExecutionContext());
    if (!context_) throw Error(file_ + ": cannot create a TensorRT execution context");

    std::vector<TensorSpec> specs = engine.inputs;
    specs.push_back(engine.outputs[0]);
    if (engine_->getNbIOTensors() != static_cast<int32_t>(specs.size()))
      throw Error(file_ + ": the plan has " + std::to_string(engine_->getNbIOTensors()) + " I/O tensors, manifest.json lists " +
                  std::to_string(specs.size()));
    for (const TensorSpec& spec : specs) {  // one device buffer per tensor, sized for the largest batch
      const char* name = spec.name.c_str();
      const auto want = spec.dtype == DType::Float32 ? nvinfer1::DataType::kFLOAT : nvinfer1::DataType::kINT64;
      const bool is_input = &spec != &specs.back();
      if (engine_->getTensorIOMode(name) != (is_input ? nvinfer1::TensorIOMode::kINPUT : nvinfer1::TensorIOMode::kOUTPUT))
        throw Error(file_ + ": the plan has no " + (is_input ? "input" : "output") + " named '" + spec.name + "'");
      if (engine_->getTensorDataType(name) != want)
        throw Error(file_ + ": tensor '" + spec.name + "' in the plan is not " + dtype_name(spec.dtype));
      if (spec.shape.size() > static_cast<size_t>(nvinfer1::Dims::MAX_DIMS))
        throw Error(file_ + ": tensor '" + spec.name + "' has more dimensions than TensorRT supports");
      std::vector<int64_t> shape = spec.shape;
      shape[0] = batch_max_;
      void* p = nullptr;
      cuda_check(cudaMalloc(&p, numel(shape) * dtype_size(spec.dtype)), "cudaMalloc for '" + spec.name + "'");
      buffers_.emplace_back(p);
      if (!context_->setTensorAddress(name, p)) throw Error(file_ + ": cannot bind tensor '" + spec.name + "'");
      names_.push_back(spec.name);
    }
    cuda_check(cudaStreamCreate(&stream_), "cudaStreamCreate");  // last: a throw above would leak it
  }

  ~TensorRTBackend() override {
    if (stream_) cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "tensorrt"; }

  void run(const std::vector<TensorView>& inputs, float* denoised) override {
    if (inputs.empty() || inputs[0].shape[0] > batch_max_) throw Error(file_ + ": batch exceeds io.batch.max");
    for (size_t i = 0; i < inputs.size(); ++i) {
      nvinfer1::Dims dims{};
      dims.nbDims = static_cast<int32_t>(inputs[i].shape.size());
      for (int32_t k = 0; k < dims.nbDims; ++k) dims.d[k] = inputs[i].shape[k];
      if (!context_->setInputShape(names_[i].c_str(), dims))
        throw Error(file_ + ": input '" + names_[i] + "' shape " + shape_str(inputs[i].shape) + " is outside the plan's profile");
      const size_t bytes = numel(inputs[i].shape) * dtype_size(inputs[i].dtype);
      cuda_check(cudaMemcpyAsync(buffers_[i].get(), inputs[i].data, bytes, cudaMemcpyHostToDevice, stream_), "copy '" + names_[i] + "' to the GPU");
    }
    if (!context_->enqueueV3(stream_)) throw Error(file_ + ": enqueueV3 failed");
    const size_t out_bytes = numel(inputs[0].shape) * sizeof(float);
    cuda_check(cudaMemcpyAsync(denoised, buffers_.back().get(), out_bytes, cudaMemcpyDeviceToHost, stream_), "copy 'denoised' to the host");
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

 private:
  std::string file_;
  int64_t batch_max_;
  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;  // TensorRT 10 objects are released with delete
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  cudaStream_t stream_ = nullptr;
  std::vector<std::unique_ptr<void, CudaFree>> buffers_;  // inputs in order, then 'denoised'
  std::vector<std::string> names_;
};

}  // namespace

std::unique_ptr<Backend> open_tensorrt(const Engine& engine) { return std::make_unique<TensorRTBackend>(engine); }

}  // namespace diffexport
