// Field accessors over nlohmann/json and parse errors with line and column.
#include "diffexport/manifest_json.h"

#include <cmath>

namespace diffexport {

void Field::wrong_type(const char* wanted) const {
  throw Error(path_ + ": expected " + wanted + ", got " + value_->type_name());
}

Field Field::at(const std::string& key) const {
  if (!value_->is_object()) wrong_type("an object");
  auto it = value_->find(key);
  if (it == value_->end()) throw Error(child(key) + ": required key is missing");
  return Field(*it, child(key));
}

bool Field::has(const std::string& key) const {
  if (!value_->is_object()) return false;
  auto it = value_->find(key);
  return it != value_->end() && !it->is_null();
}

std::vector<Field> Field::array() const {
  if (!value_->is_array()) wrong_type("an array");
  std::vector<Field> out;
  for (size_t i = 0; i < value_->size(); ++i) out.emplace_back((*value_)[i], path_ + "[" + std::to_string(i) + "]");
  return out;
}

std::vector<std::pair<std::string, Field>> Field::items() const {
  if (!value_->is_object()) wrong_type("an object");
  std::vector<std::pair<std::string, Field>> out;
  for (auto it = value_->begin(); it != value_->end(); ++it) out.emplace_back(it.key(), Field(it.value(), child(it.key())));
  return out;
}

const std::string& Field::str() const {
  if (!value_->is_string()) wrong_type("a string");
  return value_->get_ref<const std::string&>();
}

double Field::number() const {
  if (!value_->is_number()) wrong_type("a number");
  return value_->get<double>();
}

int64_t Field::integer() const {
  if (value_->is_number_integer()) return value_->get<int64_t>();
  const double v = number();
  if (v != std::floor(v)) throw Error(path_ + ": expected a whole number, got " + value_->dump());
  return static_cast<int64_t>(v);
}

bool Field::boolean() const {
  if (!value_->is_boolean()) wrong_type("a boolean");
  return value_->get<bool>();
}

Json parse_json(const std::string& text, const std::string& source) {
  try {
    return Json::parse(text);
  } catch (const Json::parse_error& e) {
    size_t line = 1, col = 1;  // nlohmann reports a byte offset: turn it into line:column
    for (size_t i = 0; i + 1 < e.byte && i < text.size(); ++i) text[i] == '\n' ? (++line, col = 1) : ++col;
    std::string why = e.what();
    const size_t colon = why.rfind(": ");
    throw Error(source + ":" + std::to_string(line) + ":" + std::to_string(col) + ": invalid JSON (" +
                (colon == std::string::npos ? why : why.substr(colon + 2)) + ")");
  }
}

}  // namespace diffexport
