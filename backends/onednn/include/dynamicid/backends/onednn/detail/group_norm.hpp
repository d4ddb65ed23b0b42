// dynamicid onednn backend, internal: group normalisation, forward and backward.
//
// oneDNN 2.x has no group-norm primitive, so these are two-pass kernels of our
// own. Forward: statistics per (sample, group) with several accumulators (so
// the loop vectorises), then one fused multiply-add per element with the
// per-channel scale r * gamma and shift beta - mean * r * gamma folded
// together. Backward: per (sample, channel) the sums of dy and of
// dy * (x - mean), which give the affine gradients and the two group means the
// input gradient needs; then dx = a_c * dy + b * (x - mean) + c0 per element.
#pragma once

#include <dynamicid/backends/cpu/detail/parallel.hpp>
#include <dynamicid/core/descriptors.hpp>
#include <dynamicid/core/dtype.hpp>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace dynamicid::onednn::detail {

// Two sums over n values, in double: of first(i) and of second(i), where
// `pair(i, first, second)` writes the two float terms of element i. Blocks of
// 1024 accumulate in float lanes (so the loop vectorises), then fold into
// double.
template <class Pair>
void paired_sums(index_t n, Pair pair, double& sum_first, double& sum_second) {
    constexpr int lanes = 16;
    sum_first = 0;
    sum_second = 0;
    index_t i = 0;
    while (i < n) {
        const index_t end = std::min<index_t>(n, i + 1024);
        float s[lanes] = {}, q[lanes] = {};
        for (; i + lanes <= end; i += lanes)
            for (int l = 0; l < lanes; ++l) {
                float a, b;
                pair(i + l, a, b);
                s[l] += a;
                q[l] += b;
            }
        for (; i < end; ++i) {
            float a, b;
            pair(i, a, b);
            s[0] += a;
            q[0] += b;
        }
        for (int l = 0; l < lanes; ++l) {
            sum_first += s[l];
            sum_second += q[l];
        }
    }
}

// Sum and sum of squared deviations from `shift` over n values, in double.
template <class T>
void moments(const T* x, index_t n, float shift, double& sum, double& sq) {
    paired_sums(
        n,
        [&](index_t i, float& a, float& b) {
            a = static_cast<float>(x[i]) - shift;
            b = a * a;
        },
        sum, sq);
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

// Sums of dy and of dy * (x - m) over n values, in double. Centring on the
// saved mean avoids the cancellation of sum(dy * x) - m * sum(dy) for inputs
// with a large mean.
template <class T>
void gradient_moments(const T* x, const T* dy, index_t n, float m, double& sdy, double& sdyx) {
    paired_sums(
        n,
        [&](index_t i, float& a, float& b) {
            a = static_cast<float>(dy[i]);
            b = a * (static_cast<float>(x[i]) - m);
        },
        sdy, sdyx);
}

// dx, dgamma and dbeta may each be null; gamma null means a unit scale.
template <class T>
void group_norm_backward(int threads, const group_norm_desc& d, const T* x, const T* gamma, const float* mean, const float* rstd,
                         const T* dy, T* dx, T* dgamma, T* dbeta) {
    const index_t cg = d.c / d.groups, len = cg * d.spatial, segments = d.n * d.groups;
    const bool params = dgamma || dbeta;
    // Per (sample, channel): sum(dy) and r * sum(dy * (x - mean)), kept for the
    // affine gradients' reduction over the batch.
    std::vector<double> sums_dy(params ? static_cast<std::size_t>(d.n * d.c) : 0),
        sums_dyxhat(params ? static_cast<std::size_t>(d.n * d.c) : 0);
    cpu::detail::parallel_for(threads, segments, 1, [&](index_t s0, index_t s1) {
        for (index_t s = s0; s < s1; ++s) {
            const index_t group = s % d.groups, sample = s / d.groups;
            const float m = mean[s], r = rstd[s];
            const T* xs = x + s * len;
            const T* dys = dy + s * len;
            // The group's means of g = dy * gamma and of g * xhat.
            double mean_g = 0, mean_gxhat = 0;
            for (index_t cl = 0; cl < cg; ++cl) {
                const index_t ch = group * cg + cl;
                double a = 0, b = 0;
                gradient_moments(xs + cl * d.spatial, dys + cl * d.spatial, d.spatial, m, a, b);
                b *= r;
                if (params) {
                    const auto at = static_cast<std::size_t>(sample * d.c + ch);
                    sums_dy[at] = a;
                    sums_dyxhat[at] = b;
                }
                const double g = gamma ? static_cast<double>(static_cast<float>(gamma[ch])) : 1.0;
                mean_g += g * a;
                mean_gxhat += g * b;
            }
            if (!dx || len == 0) continue;
            mean_g /= static_cast<double>(len);
            mean_gxhat /= static_cast<double>(len);
            // dx = r * (g - mean_g - xhat * mean_gxhat), per channel an affine map of dy and x - mean.
            const float b = static_cast<float>(-static_cast<double>(r) * r * mean_gxhat), c0 = static_cast<float>(-r * mean_g);
            for (index_t cl = 0; cl < cg; ++cl) {
                const index_t ch = group * cg + cl;
                const float a = r * (gamma ? static_cast<float>(gamma[ch]) : 1.0f);
                const T* xc = xs + cl * d.spatial;
                const T* dyc = dys + cl * d.spatial;
                T* dxc = dx + s * len + cl * d.spatial;
                for (index_t i = 0; i < d.spatial; ++i)
                    dxc[i] = T(a * static_cast<float>(dyc[i]) + b * (static_cast<float>(xc[i]) - m) + c0);
            }
        }
    });
    if (!params) return;
    for (index_t ch = 0; ch < d.c; ++ch) {
        double g = 0, b = 0;
        for (index_t sample = 0; sample < d.n; ++sample) {
            const auto at = static_cast<std::size_t>(sample * d.c + ch);
            g += sums_dyxhat[at];
            b += sums_dy[at];
        }
        if (dgamma) dgamma[ch] = T(static_cast<float>(g));
        if (dbeta) dbeta[ch] = T(static_cast<float>(b));
    }
}

}  // namespace dynamicid::onednn::detail
