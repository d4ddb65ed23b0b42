// dynamicid: version of the library headers.
#pragma once

#define DYNAMICID_VERSION_MAJOR 0
#define DYNAMICID_VERSION_MINOR 1
#define DYNAMICID_VERSION_PATCH 0
#define DYNAMICID_VERSION_STRING "0.1.0"

namespace dynamicid {

/// The version of the headers in use, e.g. `dynamicid::version.major == 0`.
struct version_info {
    int major, minor, patch;
    const char* string;
};
inline constexpr version_info version{DYNAMICID_VERSION_MAJOR, DYNAMICID_VERSION_MINOR,
                                      DYNAMICID_VERSION_PATCH, DYNAMICID_VERSION_STRING};

}  // namespace dynamicid
