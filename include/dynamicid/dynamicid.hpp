// dynamicid: the backend-independent core. Include a backend header
// (e.g. <dynamicid/backends/cpu.hpp>) next to it to run anything.
#pragma once

#include <dynamicid/core/backend.hpp>
#include <dynamicid/core/config.hpp>
#include <dynamicid/core/descriptors.hpp>
#include <dynamicid/core/dtype.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/core/philox.hpp>
#include <dynamicid/core/shape.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/ops.hpp>
#include <dynamicid/version.hpp>
