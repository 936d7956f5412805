// Loading and checking manifest.json; choosing a backend.
#include "diffexport/engine.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "diffexport/sha256.h"

namespace fs = std::filesystem;

namespace diffexport {
namespace {

TensorSpec tensor_spec(const Json& j) {
  TensorSpec t;
  t.name = j.at("name").as_string();
  t.kind = j.has("kind") ? j.at("kind").as_string() : "tensor";
  try {
    t.dtype = parse_dtype(j.at("dtype").as_string());
  } catch (const Error& e) {
    throw Error(j.path() + ".dtype: " + e.what());
  }
  for (const Json& d : j.at("shape").as_array()) t.shape.push_back(d.as_int());
  return t;
}

void check_io(const Engine& e) {
  if (e.inputs.size() < 2 || e.inputs[0].name != "x" || e.inputs[1].name != "sigma")
    throw Error("io.inputs: the first two inputs must be 'x' and 'sigma'");
  const TensorSpec &x = e.inputs[0], &sigma = e.inputs[1];
  if (x.shape.size() != 4 || x.dtype != DType::Float32) throw Error("io.inputs[0]: 'x' must be float32 [B, C, H, W], got " + shape_str(x.shape));
  if (sigma.shape.size() != 1 || sigma.dtype != DType::Float32) throw Error("io.inputs[1]: 'sigma' must be float32 [B], got " + shape_str(sigma.shape));
  if (e.outputs.size() != 1 || e.outputs[0].shape != x.shape || e.outputs[0].dtype != DType::Float32)
    throw Error("io.outputs: expected one float32 output shaped like 'x' " + shape_str(x.shape));
  for (size_t i = 0; i < e.inputs.size(); ++i) {
    const auto& s = e.inputs[i].shape;
    if (s.empty() || s[0] != -1) throw Error("io.inputs[" + std::to_string(i) + "].shape: the first dimension must be the batch (-1)");
    for (size_t k = 1; k < s.size(); ++k)
      if (s[k] < 1) throw Error("io.inputs[" + std::to_string(i) + "].shape: only the batch may be dynamic, got " + shape_str(s));
  }
  if (!(1 <= e.batch_min && e.batch_min <= e.batch_max))
    throw Error("io.batch: need 1 <= min <= max, got min=" + std::to_string(e.batch_min) + ", max=" + std::to_string(e.batch_max));
}

SamplerSpec sampler_spec(const Json& j) {
  SamplerSpec s;
  const Json& sched = j.at("scheduler");
  s.scheduler = sched.at("class").as_string();
  if (const Json* args = sched.find("args")) {
    auto arg = [&](const char* k) { return args->has(k) ? args->at(k).as_number() : 0.0; };
    s.sigma_min = arg("sigma_min"), s.sigma_max = arg("sigma_max"), s.rho = arg("rho");
  }
  s.solver = j.at("solver").as_string();
  s.num_steps = static_cast<int>(j.at("num_steps").as_int());
  if (const Json* v = j.find("sigmas"))
    for (const Json& x : v->as_array()) s.sigmas.push_back(x.as_number());
  if (const Json* v = j.find("solver_options"))
    for (const auto& kv : v->items()) s.solver_options.push_back(kv.first);
  s.patching = j.find("patching") != nullptr;
  return s;
}

}  // namespace

Engine load_engine(const std::string& dir) {
  const std::string path = (fs::path(dir) / "manifest.json").string();
  if (!fs::is_directory(dir)) throw Error(dir + ": engine directory not found");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": missing (not an engine directory built by `diffexport build`?)");
  std::stringstream text;
  text << in.rdbuf();
  Engine e;
  e.dir = dir;
  e.manifest = Json::parse(text.str(), path);
  try {
    const Json& m = e.manifest;
    const std::string& format = m.at("format").as_string();
    if (format != "diffexport-engine/1") throw Error("format: expected 'diffexport-engine/1', got '" + format + "'");
    e.name = m.at("name").as_string();
    const Json& io = m.at("io");
    for (const Json& t : io.at("inputs").as_array()) e.inputs.push_back(tensor_spec(t));
    for (const Json& t : io.at("outputs").as_array()) e.outputs.push_back(tensor_spec(t));
    const Json& batch = io.at("batch");
    e.batch_min = batch.has("min") ? batch.at("min").as_int() : 1;
    e.batch_max = batch.at("max").as_int();
    e.batch_opt = batch.has("opt") ? batch.at("opt").as_int() : e.batch_min;
    check_io(e);
    e.sampler = sampler_spec(m.at("sampler"));
  } catch (const Error& err) {
    throw Error(path + ": " + err.what());
  }
  return e;
}

std::string Engine::verified_artifact(const std::string& target) const {
  const std::string where = (fs::path(dir) / "manifest.json").string();
  const Json* arts = manifest.find("artifacts");
  const Json* art = arts ? arts->find(target) : nullptr;
  if (!art) {
    std::string built;
    if (arts)
      for (const auto& kv : arts->items()) built += (built.empty() ? "" : ", ") + kv.first;
    throw Error(where + ": the engine has no '" + target + "' artifact (built: " + (built.empty() ? "none" : built) + ")");
  }
  std::string file;
  std::map<std::string, std::string> hashes;  // every file of the artifact -> sha256
  try {
    const std::string& name = art->at("file").as_string();
    file = (fs::path(dir) / name).string();
    hashes[name] = art->at("sha256").as_string();
    if (const Json* files = art->find("files"))  // artifacts made of several files (ONNX external data)
      for (const auto& kv : files->items()) hashes[kv.first] = kv.second.as_string();
  } catch (const Error& err) {
    throw Error(where + ": " + err.what());
  }
  for (const auto& [name, want] : hashes) {
    const std::string path = (fs::path(dir) / name).string();
    if (!fs::is_regular_file(path)) throw Error(path + ": missing (listed as artifacts." + target + " in manifest.json)");
    const std::string got = sha256_file(path);
    if (got != want)
      throw Error(path + ": corrupted: its sha256 " + got.substr(0, 16) + "... does not match manifest.json (" + want.substr(0, 16) +
                  "...); rebuild the engine");
  }
  return file;
}

#ifndef DIFFEXPORT_WITH_TENSORRT
std::unique_ptr<Backend> open_tensorrt(const Engine& engine) {
  throw Error(engine.dir + ": this runner was built without TensorRT; configure with -DDIFFEXPORT_WITH_TENSORRT=ON");
}
#endif

std::unique_ptr<Backend> open_backend(const Engine& engine, const std::string& name, int threads) {
  if (name == "aoti") return open_aoti(engine, threads);
  if (name == "tensorrt") return open_tensorrt(engine);
  if (name != "auto") throw Error("unknown backend '" + name + "' (expected aoti, tensorrt or auto)");
#ifdef DIFFEXPORT_WITH_TENSORRT
  const Json* arts = engine.manifest.find("artifacts");
  if (arts && arts->find("tensorrt")) return open_tensorrt(engine);
#endif
  return open_aoti(engine, threads);  // without an aoti artifact: the error lists what was built
}

}  // namespace diffexport
