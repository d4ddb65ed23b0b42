// dynamicid cpu backend, internal: 2-D convolution as tiled im2col + GEMM.
//
// The column matrix of a whole SD VAE activation would take gigabytes, so the
// output rows are processed in tiles whose column matrix stays near 2M values.
// 1x1 stride-1 unpadded convolutions skip im2col and multiply the input directly.
#pragma once

#include <dynamicid/backends/cpu/detail/gemm.hpp>
#include <dynamicid/core/descriptors.hpp>
#include <dynamicid/core/dtype.hpp>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace dynamicid::cpu::detail {

inline bool is_pointwise(const conv2d_desc& d) {
    return d.kh == 1 && d.kw == 1 && d.stride_h == 1 && d.stride_w == 1 && d.pad_h == 0 && d.pad_w == 0;
}

inline index_t tile_rows(const conv2d_desc& d) {
    const index_t k = (d.c_in / d.groups) * d.kh * d.kw;
    const index_t per_row = std::max<index_t>(1, k * d.out_w());
    return std::clamp<index_t>((index_t{2} << 20) / per_row, 1, std::max<index_t>(1, d.out_h()));
}

// col (K, rows*ow) for output rows [oy0, oy0+rows) of channel group starting at c0.
template <class S, class T>
void im2col(int threads, const conv2d_desc& d, const T* x, index_t c0, index_t oy0, index_t rows, S* col) {
    const index_t cg = d.c_in / d.groups, ow = d.out_w(), cols = rows * ow;
    parallel_for(threads, cg * d.kh * d.kw, 4, [&](index_t r0, index_t r1) {
        for (index_t r = r0; r < r1; ++r) {
            const index_t c = r / (d.kh * d.kw), ky = (r / d.kw) % d.kh, kx = r % d.kw;
            const T* plane = x + (c0 + c) * d.h * d.w;
            S* out = col + r * cols;
            for (index_t oy = 0; oy < rows; ++oy) {
                const index_t iy = (oy0 + oy) * d.stride_h - d.pad_h + ky * d.dilation_h;
                S* o = out + oy * ow;
                if (iy < 0 || iy >= d.h) {
                    std::fill(o, o + ow, S(0));
                    continue;
                }
                for (index_t ox = 0; ox < ow; ++ox) {
                    const index_t ix = ox * d.stride_w - d.pad_w + kx * d.dilation_w;
                    o[ox] = (ix < 0 || ix >= d.w) ? S(0) : static_cast<S>(plane[iy * d.w + ix]);
                }
            }
        }
    });
}

// dx += col2im(dcol) for the same tile; parallel over input channels (no races).
template <class S>
void col2im(int threads, const conv2d_desc& d, const S* col, index_t oy0, index_t rows, S* dx_group) {
    const index_t cg = d.c_in / d.groups, ow = d.out_w(), cols = rows * ow;
    parallel_for(threads, cg, 1, [&](index_t c_begin, index_t c_end) {
        for (index_t c = c_begin; c < c_end; ++c)
            for (index_t ky = 0; ky < d.kh; ++ky)
                for (index_t kx = 0; kx < d.kw; ++kx) {
                    const S* in = col + ((c * d.kh + ky) * d.kw + kx) * cols;
                    S* plane = dx_group + c * d.h * d.w;
                    for (index_t oy = 0; oy < rows; ++oy) {
                        const index_t iy = (oy0 + oy) * d.stride_h - d.pad_h + ky * d.dilation_h;
                        if (iy < 0 || iy >= d.h) continue;
                        for (index_t ox = 0; ox < ow; ++ox) {
                            const index_t ix = ox * d.stride_w - d.pad_w + kx * d.dilation_w;
                            if (ix >= 0 && ix < d.w) plane[iy * d.w + ix] += in[oy * ow + ox];
                        }
                    }
                }
    });
}

// Storage-type weights are widened once per call; f32/f64 weights are used in place.
template <class S, class T>
class widened {
public:
    widened(const T* p, index_t n) {
        if constexpr (std::is_same_v<S, T>) {
            data_ = p;
        } else {
            copy_.resize(static_cast<std::size_t>(n));
            for (index_t i = 0; i < n; ++i) copy_[static_cast<std::size_t>(i)] = static_cast<S>(p[i]);
            data_ = copy_.data();
        }
    }
    const S* data() const noexcept { return data_; }

private:
    std::vector<S> copy_;
    const S* data_ = nullptr;
};

// Compute type: double for double, float otherwise.
template <class T>
using conv_compute_t = accum_t<T>;

template <class T>
void conv2d_forward(int threads, const conv2d_desc& d, const T* x, const T* w, const T* bias, T* y) {
    using S = conv_compute_t<T>;
    const index_t cg = d.c_in / d.groups, og = d.c_out / d.groups, k = cg * d.kh * d.kw;
    const index_t oh = d.out_h(), ow = d.out_w(), tile = tile_rows(d);
    const widened<S, T> wide_w(w, d.c_out * k);
    std::vector<S> col(static_cast<std::size_t>(k * tile * ow)), out(static_cast<std::size_t>(og * tile * ow));
    const bool direct = is_pointwise(d) && std::is_same_v<S, T>;
    for (index_t n = 0; n < d.n; ++n)
        for (index_t g = 0; g < d.groups; ++g)
            for (index_t oy0 = 0; oy0 < oh; oy0 += tile) {
                const index_t rows = std::min(tile, oh - oy0), cols = rows * ow;
                const S* colp;
                if (direct) {
                    colp = reinterpret_cast<const S*>(x + (n * d.c_in + g * cg) * d.h * d.w + oy0 * ow);
                } else {
                    im2col<S>(threads, d, x + n * d.c_in * d.h * d.w, g * cg, oy0, rows, col.data());
                    colp = col.data();
                }
                gemm_desc gd{.m = og, .n = cols, .k = k, .lda = k, .ldb = direct ? oh * ow : cols, .ldc = cols};
                gemm_native<S>(threads, gd, wide_w.data() + g * og * k, colp, out.data());
                parallel_for(threads, og, 1, [&](index_t o0, index_t o1) {
                    for (index_t o = o0; o < o1; ++o) {
                        const index_t oc = g * og + o;
                        const S b = bias ? static_cast<S>(bias[oc]) : S(0);
                        T* dst = y + ((n * d.c_out + oc) * oh + oy0) * ow;
                        const S* src = out.data() + o * cols;
                        for (index_t i = 0; i < cols; ++i) dst[i] = T(src[i] + b);
                    }
                });
            }
}

template <class T>
void conv2d_backward_data(int threads, const conv2d_desc& d, const T* w, const T* dy, T* dx) {
    using S = conv_compute_t<T>;
    const index_t cg = d.c_in / d.groups, og = d.c_out / d.groups, k = cg * d.kh * d.kw;
    const index_t oh = d.out_h(), ow = d.out_w(), tile = tile_rows(d);
    const widened<S, T> wide_w(w, d.c_out * k);
    std::vector<S> dcol(static_cast<std::size_t>(k * tile * ow)), dyt(static_cast<std::size_t>(og * tile * ow)),
        acc(static_cast<std::size_t>(cg * d.h * d.w));
    for (index_t n = 0; n < d.n; ++n)
        for (index_t g = 0; g < d.groups; ++g) {
            std::fill(acc.begin(), acc.end(), S(0));
            for (index_t oy0 = 0; oy0 < oh; oy0 += tile) {
                const index_t rows = std::min(tile, oh - oy0), cols = rows * ow;
                for (index_t o = 0; o < og; ++o) {
                    const T* src = dy + ((n * d.c_out + g * og + o) * oh + oy0) * ow;
                    for (index_t i = 0; i < cols; ++i) dyt[static_cast<std::size_t>(o * cols + i)] = static_cast<S>(src[i]);
                }
                gemm_desc gd{.m = k, .n = cols, .k = og, .trans_a = true, .lda = k, .ldb = cols, .ldc = cols};
                gemm_native<S>(threads, gd, wide_w.data() + g * og * k, dyt.data(), dcol.data());
                col2im<S>(threads, d, dcol.data(), oy0, rows, acc.data());
            }
            T* dst = dx + (n * d.c_in + g * cg) * d.h * d.w;
            for (index_t i = 0; i < cg * d.h * d.w; ++i) dst[i] = T(acc[static_cast<std::size_t>(i)]);
        }
}

template <class T>
void conv2d_backward_weight(int threads, const conv2d_desc& d, const T* x, const T* dy, T* dw, T* dbias) {
    using S = conv_compute_t<T>;
    const index_t cg = d.c_in / d.groups, og = d.c_out / d.groups, k = cg * d.kh * d.kw;
    const index_t oh = d.out_h(), ow = d.out_w(), tile = tile_rows(d);
    std::vector<S> col(static_cast<std::size_t>(k * tile * ow)), dyt(static_cast<std::size_t>(og * tile * ow)),
        acc(static_cast<std::size_t>(d.c_out * k), S(0)), bias_acc(static_cast<std::size_t>(d.c_out), S(0));
    for (index_t n = 0; n < d.n; ++n)
        for (index_t g = 0; g < d.groups; ++g)
            for (index_t oy0 = 0; oy0 < oh; oy0 += tile) {
                const index_t rows = std::min(tile, oh - oy0), cols = rows * ow;
                for (index_t o = 0; o < og; ++o) {
                    const T* src = dy + ((n * d.c_out + g * og + o) * oh + oy0) * ow;
                    S sum = 0;
                    for (index_t i = 0; i < cols; ++i) {
                        const S v = static_cast<S>(src[i]);
                        dyt[static_cast<std::size_t>(o * cols + i)] = v;
                        sum += v;
                    }
                    bias_acc[static_cast<std::size_t>(g * og + o)] += sum;
                }
                if (!dw) continue;
                im2col<S>(threads, d, x + n * d.c_in * d.h * d.w, g * cg, oy0, rows, col.data());
                gemm_desc gd{.m = og, .n = k, .k = cols, .trans_b = true, .lda = cols, .ldb = cols, .ldc = k, .beta = 1.0};
                gemm_native<S>(threads, gd, dyt.data(), col.data(), acc.data() + g * og * k);
            }
    if (dw)
        for (index_t i = 0; i < d.c_out * k; ++i) dw[i] = T(acc[static_cast<std::size_t>(i)]);
    if (dbias)
        for (index_t i = 0; i < d.c_out; ++i) dbias[i] = T(bias_acc[static_cast<std::size_t>(i)]);
}

}  // namespace dynamicid::cpu::detail
