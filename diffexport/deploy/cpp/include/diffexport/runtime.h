// diffexport C++ runtime: load an engine directory and sample from it without Python.
//
//   diffexport::Sampler sampler("engines/quickstart");            // refuses an unverified engine
//   diffexport::Array samples = sampler.sample(diffexport::read_npy("latents.npy"));
//   diffexport::write_npy("samples.npy", samples);
#pragma once

#include "diffexport/conditions.h"
#include "diffexport/engine.h"
#include "diffexport/error.h"
#include "diffexport/manifest_json.h"
#include "diffexport/npy.h"
#include "diffexport/sampler.h"
#include "diffexport/verdict.h"
