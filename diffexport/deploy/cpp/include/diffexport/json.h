// A small JSON reader: enough for manifest.json, with errors that name the field path.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "diffexport/error.h"

namespace diffexport {

/// One parsed JSON value. Every value remembers its path in the document (e.g.
/// `io.inputs[1].shape`), so accessors throw `Error`s that say which field is wrong.
/// Python's `NaN`, `Infinity` and `-Infinity` are accepted, as `json.dumps` writes them.
class Json {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  Type type() const { return type_; }
  const std::string& path() const { return path_; }
  bool is_null() const { return type_ == Type::Null; }

  bool as_bool() const;
  double as_number() const;
  int64_t as_int() const;  ///< a number that is a whole value
  const std::string& as_string() const;
  const std::vector<Json>& as_array() const;

  bool has(const std::string& key) const;  ///< object with `key` (false for non-objects)
  const Json& at(const std::string& key) const;  ///< `Error` naming the path when missing
  const Json* find(const std::string& key) const;  ///< nullptr when missing or null
  const std::map<std::string, Json>& items() const;

  /// Parse `text`; `Error("SOURCE:LINE:COL: ...")` on malformed input.
  static Json parse(const std::string& text, const std::string& source = "<json>");

 private:
  friend class JsonParser;
  [[noreturn]] void wrong_type(const char* wanted) const;

  Type type_ = Type::Null;
  bool bool_ = false;
  double number_ = 0;
  std::string string_, path_;
  std::vector<Json> array_;
  std::map<std::string, Json> object_;
};

const char* type_name(Json::Type type);

}  // namespace diffexport
