// dynamicid: every op (forward, backward, inference form).
#pragma once

#include <dynamicid/ops/activation.hpp>
#include <dynamicid/ops/attention.hpp>
#include <dynamicid/ops/common.hpp>
#include <dynamicid/ops/conv.hpp>
#include <dynamicid/ops/elementwise.hpp>
#include <dynamicid/ops/layout.hpp>
#include <dynamicid/ops/linear_algebra.hpp>
#include <dynamicid/ops/norm.hpp>
#include <dynamicid/ops/random.hpp>
