// The parity verdict every consumer honours (the rule and message of diffexport/engines/verdict.py).
#pragma once

#include <string>

#include "diffexport/error.h"
#include "diffexport/manifest_json.h"

namespace diffexport {

inline constexpr const char* kAllowFlag = "--allow-unverified";

/// An engine whose status is not `ok`, or whose parity summary lists the backend as failed.
struct UnverifiedEngine : Error {
  using Error::Error;
};

/// The one-line refusal for `engine_dir` run on `backend` ("aoti", "tensorrt"), or "" when the
/// engine is verified: the same text as `diffexport.engines.verdict.refusal`.
std::string refusal(const std::string& engine_dir, const Json& manifest, const std::string& backend);

/// Throw `UnverifiedEngine` with `refusal`'s line unless the engine is verified or `allow_unverified`.
void require_verified(const std::string& engine_dir, const Json& manifest, const std::string& backend, bool allow_unverified);

}  // namespace diffexport
