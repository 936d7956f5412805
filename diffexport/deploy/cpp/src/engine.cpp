// Loading and checking manifest.json; checking artifact hashes (OpenSSL EVP SHA-256); choosing a backend.
#include "diffexport/engine.h"

#include <openssl/evp.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>

namespace fs = std::filesystem;

namespace diffexport {
namespace {

TensorSpec tensor_spec(const Field& j) {
  TensorSpec t;
  t.name = j.at("name").str();
  t.kind = j.has("kind") ? j.at("kind").str() : "tensor";
  try {
    t.dtype = parse_dtype(j.at("dtype").str());
  } catch (const Error& e) {
    throw Error(j.path() + ".dtype: " + e.what());
  }
  for (const Field& d : j.at("shape").array()) t.shape.push_back(d.integer());
  if (j.has("high") && (t.high = j.at("high").integer()) < 1) throw Error(j.path() + ".high: expected an integer >= 1, got " + std::to_string(t.high));
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

SamplerSpec sampler_spec(const Field& j) {
  SamplerSpec s;
  const Field sched = j.at("scheduler");
  s.scheduler = sched.at("class").str();
  if (sched.has("args")) s.scheduler_args = sched.at("args").json();
  if (!s.scheduler_args.is_object()) throw Error(sched.path() + ".args: expected an object");
  s.solver = j.at("solver").str();
  s.num_steps = static_cast<int>(j.at("num_steps").integer());
  if (j.has("time_steps")) {
    s.integer_times = true;
    for (const Field& t : j.at("time_steps").array()) {
      s.time_steps.push_back(t.number());
      s.integer_times = s.integer_times && t.json().is_number_integer();
    }
  }
  if (j.has("solver_options")) s.solver_options = j.at("solver_options").json();
  if (!s.solver_options.is_object()) throw Error(j.path() + ".solver_options: expected an object");
  s.patching = j.has("patching");
  return s;
}

}  // namespace

std::string sha256_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot be read");
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) throw Error(path + ": OpenSSL cannot start a SHA-256 digest");
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    if (in.gcount() > 0 && EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<size_t>(in.gcount())) != 1)
      throw Error(path + ": OpenSSL SHA-256 update failed");
  }
  if (in.bad()) throw Error(path + ": read error");
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  if (EVP_DigestFinal_ex(ctx.get(), digest, &size) != 1) throw Error(path + ": OpenSSL SHA-256 final failed");
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < size; ++i) out += hex[digest[i] >> 4], out += hex[digest[i] & 15];
  return out;
}

Engine load_engine(const std::string& dir) {
  const std::string path = (fs::path(dir) / "manifest.json").string();
  if (!fs::is_directory(dir)) throw Error(dir + ": engine directory not found");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": missing (not an engine directory built by `diffexport build`?)");
  std::stringstream text;
  text << in.rdbuf();
  Engine e;
  e.dir = dir;
  e.manifest = parse_json(text.str(), path);
  try {
    const Field m(e.manifest, "");
    const std::string& format = m.at("format").str();
    if (format != "diffexport-engine/1") throw Error("format: expected 'diffexport-engine/1', got '" + format + "'");
    e.name = m.at("name").str();
    const Field io = m.at("io");
    for (const Field& t : io.at("inputs").array()) e.inputs.push_back(tensor_spec(t));
    for (const Field& t : io.at("outputs").array()) e.outputs.push_back(tensor_spec(t));
    const Field batch = io.at("batch");
    e.batch_min = batch.has("min") ? batch.at("min").integer() : 1;
    e.batch_max = batch.at("max").integer();
    e.batch_opt = batch.has("opt") ? batch.at("opt").integer() : e.batch_min;
    check_io(e);
    e.sampler = sampler_spec(m.at("sampler"));
  } catch (const Error& err) {
    throw Error(path + ": " + err.what());
  }
  return e;
}

void check_index_range(const TensorSpec& spec, const Array& values, const std::string& where) {
  const int64_t* v = values.i64();
  const int64_t n = numel(values.shape);
  for (int64_t i = 0; i < n; ++i)
    if (v[i] < 0 || (spec.high > 0 && v[i] >= spec.high))
      throw Error(where + "condition '" + spec.name + "' holds " + std::to_string(v[i]) + " at row " + std::to_string(i) + ", " +
                  (spec.high > 0 ? "outside its range [0, " + std::to_string(spec.high) + ")" : std::string("but must be >= 0")));
}

std::string Engine::verified_artifact(const std::string& target) const {
  const std::string where = (fs::path(dir) / "manifest.json").string();
  const Field m(manifest, "");
  if (!m.has("artifacts") || !m.at("artifacts").has(target)) {
    std::string built;
    if (m.has("artifacts"))
      for (const auto& kv : m.at("artifacts").items()) built += (built.empty() ? "" : ", ") + kv.first;
    throw Error(where + ": the engine has no '" + target + "' artifact (built: " + (built.empty() ? "none" : built) + ")");
  }
  std::string file;
  std::map<std::string, std::string> hashes;  // every file of the artifact -> sha256
  try {
    const Field art = m.at("artifacts").at(target);
    const std::string& name = art.at("file").str();
    file = (fs::path(dir) / name).string();
    hashes[name] = art.at("sha256").str();
    if (art.has("files"))  // artifacts made of several files (ONNX external data)
      for (const auto& kv : art.at("files").items()) hashes[kv.first] = kv.second.str();
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

std::string resolve_backend(const Engine& engine, const std::string& name) {
  if (name == "aoti" || name == "tensorrt") return name;
  if (name != "auto") throw Error("unknown backend '" + name + "' (expected aoti, tensorrt or auto)");
#ifdef DIFFEXPORT_WITH_TENSORRT
  const Field m(engine.manifest, "");
  if (m.has("artifacts") && m.at("artifacts").has("tensorrt")) return "tensorrt";
#else
  (void)engine;
#endif
  return "aoti";  // without an aoti artifact: the error lists what was built
}

std::unique_ptr<Backend> open_backend(const Engine& engine, const std::string& name, int threads) {
  return resolve_backend(engine, name) == "tensorrt" ? open_tensorrt(engine) : open_aoti(engine, threads);
}

}  // namespace diffexport
