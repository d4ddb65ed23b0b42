// The test matrix on the reference CPU backend: every body in tests/matrix.
#include <matrix/all.hpp>

#include <dynamicid/backends/cpu.hpp>

#define DYNAMICID_CPU_CASE(body, what) \
    TEST_CASE("cpu: " what, "[matrix][cpu]") { dynamicid::matrix::body<dynamicid::cpu_backend>(); }

DYNAMICID_MATRIX_BODIES(DYNAMICID_CPU_CASE)
