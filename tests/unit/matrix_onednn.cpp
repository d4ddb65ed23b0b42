// The test matrix on the oneDNN backend: every body in tests/matrix. Built only
// when the unit tests link dynamicid::onednn. Gradient checks run in f64 (the
// backend hands f64 to the reference code) and each is cross-checked in f32
// against the CPU backend (1e-4); bf16 forward results are held to 3e-2
// relative of the f32 ones on identical inputs.
#if __has_include(<dynamicid/backends/onednn.hpp>)
#include <matrix/all.hpp>

#include <dynamicid/backends/onednn.hpp>

#define DYNAMICID_ONEDNN_CASE(body, what) \
    TEST_CASE("onednn: " what, "[matrix][onednn]") { dynamicid::matrix::body<dynamicid::onednn_backend>(); }

DYNAMICID_MATRIX_BODIES(DYNAMICID_ONEDNN_CASE)
#endif
