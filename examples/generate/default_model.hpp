// dynamicid CLI: where the built-in default model lives.
//
// The default model (docs/default_model.md) is a small DynamicID trained by
// tools/default_model/train.sh on the procedural face world; its weights ship
// in data/default_model/. $DYNAMICID_DEFAULT_MODEL overrides the folder.
#pragma once

#include <cstdlib>
#include <filesystem>

namespace dynamicid_cli {

#ifndef DYNAMICID_DEFAULT_MODEL_DIR
#define DYNAMICID_DEFAULT_MODEL_DIR "data/default_model"
#endif

/// The default model's folder: $DYNAMICID_DEFAULT_MODEL, else the one the CLI was built with.
inline std::filesystem::path default_model_dir() {
    if (const char* env = std::getenv("DYNAMICID_DEFAULT_MODEL"); env != nullptr && *env != '\0') return env;
    return DYNAMICID_DEFAULT_MODEL_DIR;
}

}  // namespace dynamicid_cli
