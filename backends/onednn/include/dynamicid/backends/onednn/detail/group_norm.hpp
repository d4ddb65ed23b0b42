// dynamicid onednn backend, internal: group normalisation forward.
//
// oneDNN 2.x has no group-norm primitive, so this is a two-pass kernel of our
// own: statistics per (sample, group) with several accumulators (so the loop
// vectorises), then one fused multiply-add per element with the per-channel
// scale r * gamma and shift beta - mean * r * gamma folded together.
#pragma once

#include <dynamicid/backends/cpu/detail/parallel.hpp>
#include <dynamicid/core/descriptors.hpp>
#include <dynamicid/core/dtype.hpp>

#include <cmath>
#include <type_traits>

namespace dynamicid::onednn::detail {

// Sum and sum of squared deviations from `shift` over n values, in double.
template <class T>
void moments(const T* x, index_t n, float shift, double& sum, double& sq) {
    constexpr int lanes = 16;
    sum = 0;
    sq = 0;
    index_t i = 0;
    // Blocks of 1024 accumulate in float lanes (vectorised), then fold into double.
    while (i < n) {
        const index_t end = std::min<index_t>(n, i + 1024);
        float s[lanes] = {}, q[lanes] = {};
        for (; i + lanes <= end; i += lanes)
            for (int l = 0; l < lanes; ++l) {
                const float c = static_cast<float>(x[i + l]) - shift;
                s[l] += c;
                q[l] += c * c;
            }
        for (; i < end; ++i) {
            const float c = static_cast<float>(x[i]) - shift;
            s[0] += c;
            q[0] += c * c;
        }
        for (int l = 0; l < lanes; ++l) {
            sum += s[l];
            sq += q[l];
        }
    }
}

template <class T>
void group_norm_forward(int threads, const group_norm_desc& d, const T* x, const T* gamma, const T* beta, T* y, float* mean,
                        float* rstd) {
    const index_t cg = d.c / d.groups, len = cg * d.spatial, segments = d.n * d.groups;
    cpu::detail::parallel_for(threads, segments, 1, [&](index_t s0, index_t s1) {
        for (index_t s = s0; s < s1; ++s) {
            const T* xs = x + s * len;
            // Shifting by the first value keeps the one-pass variance exact enough
            // for inputs with a large mean.
            const float shift = len ? static_cast<float>(xs[0]) : 0.0f;
            double sum = 0, sq = 0;
            moments(xs, len, shift, sum, sq);
            const double n = static_cast<double>(len ? len : 1);
            const double mu_shifted = sum / n;
            const double var = std::max(0.0, sq / n - mu_shifted * mu_shifted);
            const float m = static_cast<float>(mu_shifted + shift), r = static_cast<float>(1.0 / std::sqrt(var + d.eps));
            if (mean) mean[s] = m;
            if (rstd) rstd[s] = r;
            const index_t group = s % d.groups;
            for (index_t cl = 0; cl < cg; ++cl) {
                const index_t ch = group * cg + cl;
                const float g = gamma ? static_cast<float>(gamma[ch]) : 1.0f, b = beta ? static_cast<float>(beta[ch]) : 0.0f;
                const float a = r * g, shift_out = b - m * a;
                const T* xc = xs + cl * d.spatial;
                T* yc = y + s * len + cl * d.spatial;
                for (index_t i = 0; i < d.spatial; ++i) yc[i] = T(static_cast<float>(xc[i]) * a + shift_out);
            }
        }
    });
}

}  // namespace dynamicid::onednn::detail
