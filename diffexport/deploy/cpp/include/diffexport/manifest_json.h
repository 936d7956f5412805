// manifest.json through nlohmann/json, with accessors whose errors name the field path.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "diffexport/error.h"

namespace diffexport {

using Json = nlohmann::json;

/// A JSON value and its path in the document (e.g. `io.inputs[1].shape`): every accessor throws an
/// `Error` that names the path and what was expected.
class Field {
 public:
  Field(const Json& value, std::string path) : value_(&value), path_(std::move(path)) {}

  const Json& json() const { return *value_; }
  const std::string& path() const { return path_; }

  Field at(const std::string& key) const;  ///< `Error` "PATH.key: required key is missing"
  bool has(const std::string& key) const;  ///< an object holding `key` with a non-null value
  std::vector<Field> array() const;
  std::vector<std::pair<std::string, Field>> items() const;  ///< an object's members

  const std::string& str() const;
  double number() const;
  int64_t integer() const;  ///< a number with a whole value
  bool boolean() const;

 private:
  [[noreturn]] void wrong_type(const char* wanted) const;
  std::string child(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }

  const Json* value_;
  std::string path_;
};

/// Parse `text`; `Error("SOURCE:LINE:COL: invalid JSON (...)")` on malformed input.
Json parse_json(const std::string& text, const std::string& source);

}  // namespace diffexport
