// diffexport-sample: run an engine's sampler on latents from a .npy file (or drawn from --seed),
// write the samples. Options are parsed by CLI11; conditions are taken as `diffexport sample` takes them.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <regex>
#include <sstream>

#include "diffexport/runtime.h"

namespace {

struct Args {
  std::string engine, latents, out;
  int64_t batch = 0;
  bool overwrite = false;
  std::vector<std::string> conditions;  // NAME=FILE.npy, NAME=3, NAME=0,1,2
  std::string label;                    // --label 3 or 0,1,2: the vector condition's class labels
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
      "IN.npy holds the initial latents x_N [N, C, H, W] (float16, float32 or float64): unit noise already\n"
      "scaled by the first noise level (sigma_max; unscaled for DDPM). Without --latents, N latents are drawn\n"
      "from --seed as `diffexport sample --seed S` draws them: N is --batch, else the rows of the conditions\n"
      "given with their batch axis, else 1.");
  app.add_option("--engine", a.engine, "engine directory (manifest.json)")->required()->type_name("DIR");
  app.add_option("--latents", a.latents, "initial latents .npy")->type_name("IN.npy");
  app.add_option("-n,--batch", a.batch, "number of samples (default: the rows of --latents, else of the conditions, else 1)")
      ->type_name("N")
      ->check(CLI::PositiveNumber);
  app.add_option("-o,--out", a.out, "samples .npy (written atomically; an existing file only with --overwrite)")->required()->type_name("OUT.npy");
  app.add_flag("--overwrite", a.overwrite, "replace an existing --out file");
  app.add_option("-c,--condition", a.conditions,
                 "a condition input (repeatable): FILE.npy [N, ...] (for a vector condition also class indices [N]); or 3, 0,1,2: "
                 "an index condition's values or a vector condition's one-hot class labels, cycled over the batch")
      ->type_name("NAME=FILE.npy|NAME=K[,K...]")
      ->allow_extra_args(false);
  app.add_option("--label", a.label, "class label(s) of the engine's vector condition (one-hot, cycled over the batch)")->type_name("K[,K...]");
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

/// Python's repr of a string: 'text' (\"text\" when it holds ' and no \").
std::string repr(const std::string& s) {
  const char quote = s.find('\'') != std::string::npos && s.find('"') == std::string::npos ? '"' : '\'';
  std::string out(1, quote);
  for (char c : s) out += c == '\\' || c == quote ? std::string{'\\', c} : std::string{c};
  return out + quote;
}

/// The engine's condition inputs as `diffexport sample` lists them: ['cond (image)', 'class_labels (vector)'] or none.
std::string condition_list(const diffexport::Engine& engine) {
  std::string s;
  for (size_t i = 2; i < engine.inputs.size(); ++i) s += (s.empty() ? "" : ", ") + repr(engine.inputs[i].name + " (" + engine.inputs[i].kind + ")");
  return s.empty() ? "none" : "[" + s + "]";
}

const diffexport::TensorSpec* find_condition(const diffexport::Engine& engine, const std::string& name, const std::string& kind = "") {
  for (size_t i = 2; i < engine.inputs.size(); ++i)
    if ((name.empty() || engine.inputs[i].name == name) && (kind.empty() || engine.inputs[i].kind == kind)) return &engine.inputs[i];
  return nullptr;
}

/// "0,-1,2" -> values; `ok` false when one does not fit int64.
std::vector<int64_t> integers(const std::string& text, bool& ok) {
  std::vector<int64_t> values;
  ok = true;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) {
    errno = 0;
    const long long v = std::strtoll(item.c_str(), nullptr, 10);
    ok = ok && errno != ERANGE && v != INT64_MIN;  // Python refuses |v| >= 2^63
    values.push_back(v);
  }
  return values;
}

/// `diffexport sample`'s MAX_SAMPLE_BYTES: the float32 state of one run (latents, --batch, each condition file).
constexpr int64_t kMaxSampleBytes = int64_t(2) << 30;

/// Python's "{:.1f}" of `bytes` / 1e9: "2.1".
std::string gigabytes(double bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f", bytes / 1e9);
  return text;
}

/// NumPy's name of a .npy dtype: "int32" (native byte order), ">i4" (big endian).
std::string numpy_dtype(const std::string& descr) {
  if (descr[0] == '>' && descr != ">i1" && descr != ">u1") return descr;
  static const std::map<char, std::string> kinds = {{'f', "float"}, {'i', "int"}, {'u', "uint"}};
  return kinds.at(descr[1]) + std::to_string(8 * std::atoi(descr.c_str() + 2));
}

/// A .npy input as `diffexport sample`'s `_load_npy` reads it, with its messages: a file (not a folder),
/// floats (integers when `integer_ok`), not empty, at most kMaxSampleBytes as float32, no NaN/Inf.
diffexport::Array read_input(const std::string& path, const std::string& what, bool integer_ok = true) {
  namespace fs = std::filesystem;
  using diffexport::Error;
  std::error_code ec;
  if (fs::is_directory(path, ec)) throw Error(path + ": " + what + " must be a .npy file, got a folder");
  if (!fs::exists(path, ec)) throw Error(path + ": " + what + " file not found");
  const diffexport::NpyHeader header = diffexport::read_npy_header(path);
  if (!integer_ok && header.descr[1] != 'f')
    throw Error(path + ": " + what + " must be one real float16/32/64 array, got " + numpy_dtype(header.descr));
  const int64_t n = diffexport::numel(header.shape);
  if (n == 0) throw Error(path + ": " + what + " is empty (shape " + diffexport::shape_str(header.shape) + ")");
  if (n > kMaxSampleBytes / 4)
    throw Error(path + ": " + what + " has " + std::to_string(n) + " values (" + gigabytes(4.0 * n) + " GB as float32), over the limit of " +
                gigabytes(kMaxSampleBytes) + " GB per run");
  diffexport::Array array = diffexport::read_npy(path);
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i)
    bad += array.dtype == diffexport::DType::Float32 ? !std::isfinite(array.f32()[i])
           : array.dtype == diffexport::DType::Float64 ? !std::isfinite(array.f64()[i]) : 0;
  if (bad) throw Error(path + ": " + what + " holds " + std::to_string(bad) + " NaN/Inf values");
  return array;
}

/// `--latents` as `diffexport sample` takes them: [N, C, H, W] like the engine's input 'x' (N = `batch` when
/// given), float64 cast to float32 (beyond its range: inf, as torch casts it).
diffexport::Array latents_input(const diffexport::Array& x_n, const std::string& path, const diffexport::TensorSpec& x, int64_t batch) {
  using diffexport::Error;
  std::string dims;
  for (size_t k = 1; k < x.shape.size(); ++k) dims += ", " + std::to_string(x.shape[k]);
  const std::vector<int64_t> image(x.shape.begin() + 1, x.shape.end());
  if (x_n.shape.size() != 4 || std::vector<int64_t>(x_n.shape.begin() + 1, x_n.shape.end()) != image)
    throw Error(path + ": latents must be [N" + dims + "], got shape " + diffexport::shape_str(x_n.shape));
  if (batch > 0 && x_n.shape[0] != batch)
    throw Error(path + ": latents must have shape [" + std::to_string(batch) + dims + "], got " + diffexport::shape_str(x_n.shape));
  if (x_n.dtype == diffexport::DType::Float32) return x_n;
  diffexport::Array out(diffexport::DType::Float32, x_n.shape);
  for (int64_t i = 0; i < out.numel(); ++i) out.f32()[i] = static_cast<float>(x_n.f64()[i]);
  return out;
}

/// `diffexport sample`'s `_check_inline_count`: more inline values than the batch `n` (when known) are refused.
void check_inline_count(const std::string& option, const std::string& values, int64_t n, const std::string& batch_from) {
  const int64_t count = std::count(values.begin(), values.end(), ',') + 1;
  if (n > 0 && count > n)
    throw diffexport::Error(option + ": " + std::to_string(count) + " values for a batch of " + std::to_string(n) + " (" + batch_from +
                            "); give at most " + std::to_string(n) + " (fewer are cycled over the batch)");
}

/// A condition as given: its name, where it came from (the file or the option) and its values as read.
struct Given {
  std::string name, source;
  diffexport::Array array;
};

/// `--condition` items (and `--label`) as `diffexport sample`'s `_parse_conditions` reads them: NAME=FILE.npy;
/// NAME=3 or NAME=0,1,2 (no such file): an index condition's values or a vector condition's one-hot class
/// labels, cycled over n. `n` 0 (neither --batch nor --latents): inline values and class indices make one
/// row each, and n becomes the rows of the first condition (in the engine's order) given with its batch
/// axis, else 1, as `runtime.sample` infers it.
std::vector<Given> parse_conditions(const diffexport::Engine& engine, std::vector<std::string> items, const std::string* label, int64_t& n,
                                    const std::string& batch_from) {
  using diffexport::Error;
  std::string label_name;  // the vector condition --label gives
  if (label != nullptr) {
    if (!std::regex_match(*label, std::regex("\\d+(,\\d+)*")))
      throw Error("--label expects an integer or a comma-separated list of them, got " + repr(*label));
    const diffexport::TensorSpec* vector = find_condition(engine, "", "vector");
    if (vector == nullptr) throw Error("--label: class labels need a vector condition; the engine takes " + condition_list(engine));
    for (const std::string& item : items)
      if (item.substr(0, item.find('=')) == vector->name)
        throw Error("--label: condition '" + vector->name + "' is also given with --condition; give it once");
    items.push_back(vector->name + "=" + *label);
    label_name = vector->name;
  }
  std::vector<Given> given;  // as read, before the batch and the engine's dtypes are applied
  for (const std::string& item : items) {
    const size_t eq = item.find('=');
    const std::string name = item.substr(0, eq), value = eq == std::string::npos ? "" : item.substr(eq + 1);
    if (eq == std::string::npos || name.empty() || value.empty())
      throw Error("--condition expects NAME=FILE.npy or NAME=LABEL[,LABEL...], got " + repr(item));
    if (std::any_of(given.begin(), given.end(), [&](const Given& g) { return g.name == name; }))
      throw Error("--condition " + name + ": given twice; give each condition once");
    const diffexport::TensorSpec* spec = find_condition(engine, name);
    std::error_code ec;
    const bool file = std::filesystem::exists(value, ec);
    const std::string option = name == label_name ? "--label" : "--condition " + name;
    std::string source = "--condition " + item;
    diffexport::Array array;
    bool ok = true;
    if (spec != nullptr && spec->kind == "index" && !file && std::regex_match(value, std::regex("-?\\d+(,-?\\d+)*"))) {
      check_inline_count(option, value, n, batch_from);
      const std::vector<int64_t> values = integers(value, ok);
      if (!ok) throw Error(source + ": an index condition's values are int64");
      const int64_t rows = n > 0 ? n : static_cast<int64_t>(values.size());
      array = diffexport::Array(diffexport::DType::Int64, {rows});
      for (int64_t i = 0; i < rows; ++i) array.i64()[i] = values[i % values.size()];
    } else if (!file && std::regex_match(value, std::regex("\\d+(,\\d+)*"))) {
      check_inline_count(option, value, n, batch_from);
      const diffexport::TensorSpec* vector = find_condition(engine, name, "vector");
      if (vector == nullptr)
        throw Error(source + ": class labels need a vector condition named " + repr(name) + "; the engine takes " + condition_list(engine));
      try {
        const std::vector<int64_t> labels = integers(value, ok);  // a label beyond int64 reads as out of range
        array = diffexport::one_hot(*vector, labels, n > 0 ? n : static_cast<int64_t>(labels.size()));
      } catch (const Error& e) {
        throw Error(source + ": " + e.what());
      }
    } else {
      source = value;
      array = read_input(value, "condition '" + name + "'");
      if (n == 0 && spec != nullptr && spec->kind == "vector" && array.dtype == diffexport::DType::Int64 && array.shape.size() == 1)
        array = diffexport::condition_input(*spec, array, array.shape[0], source);  // class indices: one row each
    }
    given.push_back({name, source, array});
  }
  for (size_t i = 2; i < engine.inputs.size() && n == 0; ++i)
    for (const Given& g : given)
      if (g.name == engine.inputs[i].name && g.array.shape.size() == engine.inputs[i].shape.size()) n = g.array.shape[0];
  n = std::max<int64_t>(n, 1);
  return given;
}

/// The engine's [n, ...] condition arrays from those `given`, as `runtime.sample`'s `check_conditions` (its lines).
diffexport::Conditions engine_conditions(const diffexport::Engine& engine, const std::vector<Given>& given, int64_t n) {
  std::string names, missing, unknown;
  std::vector<std::string> unknown_names;
  for (size_t i = 2; i < engine.inputs.size(); ++i) {
    const std::string& name = engine.inputs[i].name;
    names += (names.empty() ? "" : ", ") + repr(name);
    if (std::none_of(given.begin(), given.end(), [&](const Given& g) { return g.name == name; })) missing += (missing.empty() ? "" : ", ") + repr(name);
  }
  for (const Given& g : given)
    if (find_condition(engine, g.name) == nullptr) unknown_names.push_back(g.name);
  std::sort(unknown_names.begin(), unknown_names.end());
  for (const std::string& name : unknown_names) unknown += (unknown.empty() ? "" : ", ") + repr(name);
  if (!missing.empty() || !unknown.empty())
    throw diffexport::Error("conditions: the engine takes " + (names.empty() ? "none" : "[" + names + "]") + "; missing " +
                            (missing.empty() ? "-" : "[" + missing + "]") + ", unexpected " + (unknown.empty() ? "-" : "[" + unknown + "]"));
  diffexport::Conditions conditions;
  for (size_t i = 2; i < engine.inputs.size(); ++i)
    for (const Given& g : given)
      if (g.name == engine.inputs[i].name) conditions.emplace(g.name, diffexport::condition_input(engine.inputs[i], g.array, n, g.source));
  return conditions;
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
    check_out(args.out, args.overwrite);
    const std::vector<int64_t> x = diffexport::load_engine(args.engine).inputs.at(0).shape, image(x.begin() + 1, x.end());
    const int64_t per_sample = 4 * diffexport::numel(image);
    if (args.batch > kMaxSampleBytes / per_sample)  // before any work, as `diffexport sample`'s _check_batch
      throw diffexport::Error("--batch " + std::to_string(args.batch) + ": " + std::to_string(args.batch) + " samples of " +
                              diffexport::shape_str(image) + " float32 need " +
                              gigabytes(static_cast<double>(args.batch) * per_sample) + " GB, over the limit of " + gigabytes(kMaxSampleBytes) +
                              " GB per run (at most " + std::to_string(kMaxSampleBytes / per_sample) + "); sample in several runs");
    diffexport::Sampler sampler(args.engine, args.options);
    diffexport::Array latents = args.latents.empty() ? diffexport::Array() : read_input(args.latents, "latents", false);
    // the batch, as `diffexport sample`: --batch, else the rows of --latents, else inferred from the conditions (or 1)
    int64_t n = args.batch > 0 ? args.batch : args.latents.empty() || latents.shape.empty() ? 0 : latents.shape[0];
    const std::string batch_from = args.batch > 0 ? "--batch " + std::to_string(args.batch) : "the rows of --latents " + args.latents;
    const std::vector<Given> given =
        parse_conditions(sampler.engine(), args.conditions, app.count("--label") ? &args.label : nullptr, n, batch_from);
    if (!args.latents.empty()) latents = latents_input(latents, args.latents, sampler.engine().inputs[0], args.batch);
    const diffexport::Conditions conditions = engine_conditions(sampler.engine(), given, n);
    const auto start = std::chrono::steady_clock::now();
    const diffexport::Array samples = args.latents.empty() ? sampler.sample(n, conditions) : sampler.sample(latents, conditions);
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
