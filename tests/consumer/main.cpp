// A program outside the project that uses dynamicid the way a consumer does:
// through dynamicid::cpu, found by find_package or added with add_subdirectory.
// Exits non-zero when the result is wrong.
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/dynamicid.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
    using backend = dynamicid::cpu_backend;
    using tensor = dynamicid::tensor<backend, float>;
    static_assert(dynamicid::backend<backend>);

    backend::context ctx{.threads = 1};
    const std::vector<float> values{1.0f, 2.0f, 3.0f, -1.0f, 0.0f, 1.0f};
    const auto x = tensor::from_host(ctx, {2, 3}, values);

    const auto y = dynamicid::ops::softmax(ctx, x).to_host(ctx);
    int failures = 0;
    for (int row = 0; row < 2; ++row) {
        double total = 0.0;
        for (int col = 0; col < 3; ++col) total += std::exp(static_cast<double>(values[row * 3 + col]));
        for (int col = 0; col < 3; ++col) {
            const double expected = std::exp(static_cast<double>(values[row * 3 + col])) / total;
            const double got = y[static_cast<std::size_t>(row * 3 + col)];
            if (std::abs(got - expected) > 1e-6) {
                std::fprintf(stderr, "softmax[%d][%d] = %.8f, expected %.8f\n", row, col, got, expected);
                ++failures;
            }
        }
    }

    // Softmax rows sum to one, so an all-ones upstream gradient gives zero.
    auto [out, saved] = dynamicid::ops::softmax_forward(ctx, x);
    const auto dx = dynamicid::ops::softmax_backward(ctx, saved, tensor::full(ctx, out.shape(), 1.0f)).to_host(ctx);
    for (float g : dx) {
        if (std::abs(g) > 1e-6f) {
            std::fprintf(stderr, "softmax backward of ones gave %.8f, expected 0\n", static_cast<double>(g));
            ++failures;
        }
    }

    if (failures != 0) return 1;
    std::printf("dynamicid %s consumer: softmax forward and backward OK\n", dynamicid::version.string);
    return 0;
}
