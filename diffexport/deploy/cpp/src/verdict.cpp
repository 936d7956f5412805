// The parity verdict: the rule and message of diffexport/engines/verdict.py, kept word for word.
#include "diffexport/verdict.h"

#include <filesystem>

namespace fs = std::filesystem;

namespace diffexport {
namespace {

/// `str(pathlib.Path(p))`: no empty or "." segments, no trailing slash.
std::string python_path(const std::string& p) {
  if (p.empty()) return ".";
  std::string out = p[0] == '/' ? "/" : "";
  size_t start = 0;
  while (start <= p.size()) {
    size_t end = p.find('/', start);
    if (end == std::string::npos) end = p.size();
    const std::string part = p.substr(start, end - start);
    if (!part.empty() && part != ".") out += (out.empty() || out.back() == '/' ? "" : "/") + part;
    start = end + 1;
  }
  return out.empty() ? "." : out;
}

const Json* member(const Json& j, const char* key) {  // `j.get(key)` treating null like missing
  if (!j.is_object()) return nullptr;
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}

std::string text(const Json& j) { return j.is_string() ? j.get<std::string>() : j.dump(); }

}  // namespace

std::string refusal(const std::string& engine_dir, const Json& manifest, const std::string& backend) {
  const Json* s = member(manifest, "status");
  std::string status = s ? text(*s) : "unchecked", why;
  if (backend == "torch") return "";
  const Json* parity = member(manifest, "parity");
  if (status != "ok") {
    why = status == "failed" ? "parity failed" : "parity was not run";
  } else {
    const Json* backends = parity ? member(*parity, "backends") : nullptr;
    const Json* entry = backends && backends->is_object() ? member(*backends, backend.c_str()) : nullptr;
    if (!entry || !entry->is_object()) {
      status = "unchecked", why = "parity was not run for backend " + backend;
    } else {
      const Json* passed = member(*entry, "passed");
      if (!(passed && passed->is_boolean() && passed->get<bool>())) status = "failed", why = "parity failed for backend " + backend;
    }
  }
  if (why.empty()) return "";
  const std::string dir = python_path(engine_dir);
  const Json* report_name = parity ? member(*parity, "report") : nullptr;
  const std::string report = python_path((fs::path(dir) / (report_name && !text(*report_name).empty() ? text(*report_name) : "parity.json")).string());
  const std::string seen = fs::is_regular_file(report) ? "see " + report
                                                       : "no parity report (" + fs::path(report).filename().string() + " is missing)";
  const std::string fix = status == "unchecked" ? "`diffexport parity DIR --mark` verifies it" : "rebuild or inspect it";
  const Json* name = member(manifest, "name");
  return "engine " + dir + " (" + (name ? text(*name) : "?") + ") is not verified: status " + status + ", " + why + "; " + seen + "; " +
         fix + ", or pass " + kAllowFlag + " to use it anyway";
}

void require_verified(const std::string& engine_dir, const Json& manifest, const std::string& backend, bool allow_unverified) {
  if (allow_unverified) return;
  const std::string message = refusal(engine_dir, manifest, backend);
  if (!message.empty()) throw UnverifiedEngine(message);
}

}  // namespace diffexport
