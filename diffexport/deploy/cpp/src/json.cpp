// Recursive-descent JSON parser (RFC 8259 plus Python's NaN/Infinity), building `Json` values.
#include "diffexport/json.h"

#include <cmath>
#include <cstdlib>
#include <limits>

namespace diffexport {

const char* type_name(Json::Type type) {
  static const char* names[] = {"null", "a boolean", "a number", "a string", "an array", "an object"};
  return names[static_cast<int>(type)];
}

void Json::wrong_type(const char* wanted) const {
  throw Error(path_ + ": expected " + wanted + ", got " + type_name(type_));
}

bool Json::as_bool() const {
  if (type_ != Type::Bool) wrong_type("a boolean");
  return bool_;
}

double Json::as_number() const {
  if (type_ != Type::Number) wrong_type("a number");
  return number_;
}

int64_t Json::as_int() const {
  double v = as_number();
  if (!(std::fabs(v) < 9.0e15) || v != std::floor(v)) throw Error(path_ + ": expected an integer, got " + std::to_string(v));
  return static_cast<int64_t>(v);
}

const std::string& Json::as_string() const {
  if (type_ != Type::String) wrong_type("a string");
  return string_;
}

const std::vector<Json>& Json::as_array() const {
  if (type_ != Type::Array) wrong_type("an array");
  return array_;
}

const std::map<std::string, Json>& Json::items() const {
  if (type_ != Type::Object) wrong_type("an object");
  return object_;
}

bool Json::has(const std::string& key) const { return type_ == Type::Object && object_.count(key); }

const Json* Json::find(const std::string& key) const {
  auto it = items().find(key);
  return it == object_.end() || it->second.is_null() ? nullptr : &it->second;
}

const Json& Json::at(const std::string& key) const {
  auto it = items().find(key);
  if (it == object_.end()) throw Error((path_ == "(top level)" ? "" : path_ + ".") + key + ": required key is missing");
  return it->second;
}

class JsonParser {
 public:
  JsonParser(const std::string& text, const std::string& source) : s_(text), source_(source) {}

  Json document() {
    Json root = value("(top level)", 0);
    skip_space();
    if (i_ != s_.size()) fail("unexpected text after the JSON value");
    return root;
  }

 private:
  static constexpr int kMaxDepth = 256;

  [[noreturn]] void fail(const std::string& what) const {
    size_t line = 1, col = 1;
    for (size_t k = 0; k < i_ && k < s_.size(); ++k) s_[k] == '\n' ? (++line, col = 1) : ++col;
    throw Error(source_ + ":" + std::to_string(line) + ":" + std::to_string(col) + ": invalid JSON: " + what);
  }

  void skip_space() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }

  bool consume(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (s_.compare(i_, n, word) != 0) return false;
    i_ += n;
    return true;
  }

  void expect(char c) {
    skip_space();
    if (i_ >= s_.size() || s_[i_] != c) fail(std::string("expected '") + c + "'");
    ++i_;
  }

  Json value(const std::string& path, int depth) {
    if (depth > kMaxDepth) fail("nested deeper than " + std::to_string(kMaxDepth) + " levels");
    skip_space();
    if (i_ >= s_.size()) fail("unexpected end of input");
    Json v;
    v.path_ = path;
    char c = s_[i_];
    if (c == '{') {
      v.type_ = Json::Type::Object;
      ++i_;
      skip_space();
      if (i_ < s_.size() && s_[i_] == '}') return ++i_, v;
      for (;;) {
        skip_space();
        if (i_ >= s_.size() || s_[i_] != '"') fail("expected a string key");
        std::string key = string();
        expect(':');
        v.object_[key] = value(path == "(top level)" ? key : path + "." + key, depth + 1);
        skip_space();
        if (i_ < s_.size() && s_[i_] == ',') { ++i_; continue; }
        expect('}');
        return v;
      }
    }
    if (c == '[') {
      v.type_ = Json::Type::Array;
      ++i_;
      skip_space();
      if (i_ < s_.size() && s_[i_] == ']') return ++i_, v;
      for (;;) {
        v.array_.push_back(value(path + "[" + std::to_string(v.array_.size()) + "]", depth + 1));
        skip_space();
        if (i_ < s_.size() && s_[i_] == ',') { ++i_; continue; }
        expect(']');
        return v;
      }
    }
    if (c == '"') {
      v.type_ = Json::Type::String;
      v.string_ = string();
      return v;
    }
    if (consume("true") || consume("false")) {
      v.type_ = Json::Type::Bool;
      v.bool_ = s_[i_ - 4] == 't';  // the last 4 characters read are "true" or "alse"
      return v;
    }
    if (consume("null")) return v;
    v.type_ = Json::Type::Number;
    if (consume("NaN")) v.number_ = std::numeric_limits<double>::quiet_NaN();
    else if (consume("Infinity")) v.number_ = std::numeric_limits<double>::infinity();
    else if (consume("-Infinity")) v.number_ = -std::numeric_limits<double>::infinity();
    else v.number_ = number();
    return v;
  }

  double number() {
    size_t start = i_;
    auto digits = [&] {
      size_t from = i_;
      while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') ++i_;
      return i_ > from;
    };
    if (i_ < s_.size() && s_[i_] == '-') ++i_;
    if (i_ < s_.size() && s_[i_] == '0') ++i_;
    else if (!digits()) fail("unexpected character '" + std::string(1, s_[start]) + "'");
    if (i_ < s_.size() && s_[i_] == '.' && (++i_, !digits())) fail("expected digits after '.'");
    if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
      ++i_;
      if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
      if (!digits()) fail("expected digits in the exponent");
    }
    return std::strtod(s_.substr(start, i_ - start).c_str(), nullptr);
  }

  unsigned hex4() {
    if (i_ + 4 > s_.size()) fail("truncated \\u escape");
    unsigned u = 0;
    for (int k = 0; k < 4; ++k, ++i_) {
      char h = s_[i_];
      int d = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10 : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
      if (d < 0) fail("bad hex digit in \\u escape");
      u = u * 16 + static_cast<unsigned>(d);
    }
    return u;
  }

  static void append_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | cp >> 6), out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | cp >> 12), out += static_cast<char>(0x80 | (cp >> 6 & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | cp >> 18), out += static_cast<char>(0x80 | (cp >> 12 & 0x3F));
      out += static_cast<char>(0x80 | (cp >> 6 & 0x3F)), out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  std::string string() {
    ++i_;  // opening quote
    std::string out;
    for (;;) {
      if (i_ >= s_.size()) fail("unterminated string");
      char c = s_[i_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in a string");
      if (c != '\\') { out += c; continue; }
      if (i_ >= s_.size()) fail("unterminated string");
      switch (char e = s_[i_++]) {
        case '"': case '\\': case '/': out += e; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && s_.compare(i_, 2, "\\u") == 0) {  // surrogate pair
            size_t back = i_;
            i_ += 2;
            unsigned lo = hex4();
            if (lo >= 0xDC00 && lo < 0xE000) cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            else i_ = back;
          }
          append_utf8(out, cp);
          break;
        }
        default: --i_; fail(std::string("bad escape '\\") + e + "'");
      }
    }
  }

  const std::string& s_;
  const std::string& source_;
  size_t i_ = 0;
};

Json Json::parse(const std::string& text, const std::string& source) { return JsonParser(text, source).document(); }

}  // namespace diffexport
