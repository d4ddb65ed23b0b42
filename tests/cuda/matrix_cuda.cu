// The backend test matrix on the CUDA backend, plus what only the CUDA
// backend has: the fused attention kernels, the caching allocator, events and
// error translation.
#include <matrix/all.hpp>

#include <dynamicid/backends/cuda.cuh>
#include <dynamicid/modules/dynamicid/saa.hpp>

#include <cmath>
#include <string>
#include <vector>

#define DYNAMICID_CUDA_CASE(body, what) \
    TEST_CASE("cuda: " what, "[matrix][cuda]") { dynamicid::matrix::body<dynamicid::cuda_backend>(); }

DYNAMICID_MATRIX_BODIES(DYNAMICID_CUDA_CASE)

namespace {

using dynamicid::cuda_backend;
using dynamicid::index_t;
using dynamicid::tensor;
namespace ops = dynamicid::ops;
namespace testing = dynamicid::testing;

/// Fused attention in H (tensor-core kernel where d is 40/64/80/160) against
/// the composed gemm + softmax + gemm path in f32 on the same rounded inputs.
template <class H>
void check_fused_attention(index_t batch, index_t lq, index_t lk, index_t d, double rel, std::uint64_t seed) {
    cuda_backend::context ctx;
    const auto q = testing::round_to<H>(dynamicid::matrix::host_normal(static_cast<std::size_t>(batch * lq * d), seed));
    const auto k = testing::round_to<H>(dynamicid::matrix::host_normal(static_cast<std::size_t>(batch * lk * d), seed + 1));
    const auto v = testing::round_to<H>(dynamicid::matrix::host_normal(static_cast<std::size_t>(batch * lk * d), seed + 2));
    const auto fused = ops::attention(ctx, testing::upload<cuda_backend, H>(ctx, {batch, lq, d}, q),
                                      testing::upload<cuda_backend, H>(ctx, {batch, lk, d}, k),
                                      testing::upload<cuda_backend, H>(ctx, {batch, lk, d}, v));
    const auto composed = ops::attention_forward(ctx, testing::upload<cuda_backend, float>(ctx, {batch, lq, d}, q),
                                                 testing::upload<cuda_backend, float>(ctx, {batch, lk, d}, k),
                                                 testing::upload<cuda_backend, float>(ctx, {batch, lk, d}, v))
                              .first;
    testing::check_close("fused attention batch " + std::to_string(batch) + " lq " + std::to_string(lq) + " lk " + std::to_string(lk) +
                             " d " + std::to_string(d),
                         testing::download(ctx, fused), testing::download(ctx, composed), rel, rel);
}

}  // namespace

TEST_CASE("cuda: fused f16 attention matches the composed f32 path", "[cuda][attention]") {
    std::uint64_t seed = 9000;
    for (index_t d : {40, 64, 80, 160}) {
        check_fused_attention<dynamicid::half>(3, 100, 77, d, 1e-2, seed += 3);   // partial query and key tiles
        check_fused_attention<dynamicid::half>(2, 64, 300, d, 1e-2, seed += 3);   // several key tiles
        check_fused_attention<dynamicid::half>(1, 1, 1, d, 1e-2, seed += 3);      // one query, one key
    }
    check_fused_attention<dynamicid::half>(2, 33, 45, 24, 1e-2, seed += 3);       // the warp-per-row kernel
    check_fused_attention<dynamicid::half>(1, 5, 7, 40, 1e-2, seed += 3);
}

TEST_CASE("cuda: fused bf16 attention matches the composed f32 path", "[cuda][attention]") {
    std::uint64_t seed = 9100;
    for (index_t d : {40, 64, 80, 160}) check_fused_attention<dynamicid::bfloat16>(2, 130, 200, d, 3e-2, seed += 3);
}

TEST_CASE("cuda: fused f32 attention (warp per row) matches the composed path", "[cuda][attention]") {
    check_fused_attention<float>(2, 70, 90, 40, 1e-5, 9200);
    check_fused_attention<float>(1, 17, 300, 160, 1e-5, 9203);
}

TEST_CASE("cuda: attention with dv > 256 falls back to gemm + softmax", "[cuda][attention]") {
    cuda_backend::context ctx;
    const index_t batch = 2, lq = 5, lk = 6, d = 8, dv = 300;
    const auto q = dynamicid::matrix::host_normal(static_cast<std::size_t>(batch * lq * d), 9301);
    const auto k = dynamicid::matrix::host_normal(static_cast<std::size_t>(batch * lk * d), 9302);
    const auto v = dynamicid::matrix::host_normal(static_cast<std::size_t>(batch * lk * dv), 9303);
    const auto qt = testing::upload<cuda_backend, float>(ctx, {batch, lq, d}, q);
    const auto kt = testing::upload<cuda_backend, float>(ctx, {batch, lk, d}, k);
    const auto vt = testing::upload<cuda_backend, float>(ctx, {batch, lk, dv}, v);
    testing::check_close("attention dv 300", testing::download(ctx, ops::attention(ctx, qt, kt, vt)),
                         testing::download(ctx, ops::attention_forward(ctx, qt, kt, vt).first), 1e-6, 1e-5);
}

TEST_CASE("cuda: the allocator reuses freed blocks", "[cuda][memory]") {
    cuda_backend::context ctx;
    { auto warm = cuda_backend::allocate<float>(ctx, 1000); }
    const auto held = cuda_backend::allocated_bytes(ctx);
    for (int i = 0; i < 10; ++i) {
        auto b = cuda_backend::allocate<float>(ctx, 1000);
        CHECK(b.data() != nullptr);
    }
    CHECK(cuda_backend::allocated_bytes(ctx) == held);
    cuda_backend::release_cached(ctx);
    CHECK(cuda_backend::allocated_bytes(ctx) == 0);
    // A tensor outliving its context keeps its memory valid.
    tensor<cuda_backend, float> survivor;
    {
        cuda_backend::context other;
        survivor = tensor<cuda_backend, float>::full(other, {4}, 2.5f);
        cuda_backend::synchronize(other);
    }
    CHECK(survivor.to_host(ctx) == std::vector<float>(4, 2.5f));
}

TEST_CASE("cuda: events order work across contexts", "[cuda][events]") {
    cuda_backend::context producer, consumer;
    auto x = ops::randn<cuda_backend, float>(producer, {1 << 16}, 7);
    const auto done = cuda_backend::record_event(producer);
    cuda_backend::wait_event(consumer, done);
    const auto y = ops::scale(consumer, x, 2.0);
    const auto hx = x.to_host(producer), hy = y.to_host(consumer);
    std::size_t bad = 0;
    for (std::size_t i = 0; i < hx.size(); ++i) bad += hy[i] != 2.0f * hx[i];
    CHECK(bad == 0);
}

TEST_CASE("cuda: device failures become cuda_error with a cuda-prefixed message", "[cuda][errors]") {
    cuda_backend::context ctx;
    try {
        auto huge = cuda_backend::allocate<float>(ctx, std::size_t{1} << 46);  // 256 TiB
        FAIL("allocating 256 TiB succeeded");
    } catch (const dynamicid::cuda_out_of_memory& e) {
        CHECK(std::string(e.what()).rfind("[cuda] ", 0) == 0);
    }
    // The context stays usable afterwards.
    CHECK(tensor<cuda_backend, float>::full(ctx, {3}, 1.0f).to_host(ctx) == std::vector<float>(3, 1.0f));
}

namespace {

/// The device SAA gate against the host reference (normalise_activation, then
/// apply_layout_boost) on the same rounded inputs, in element type H.
template <class H>
void check_saa_gate(bool tied, double tol) {
    namespace saa = dynamicid::modules::saa;
    cuda_backend::context ctx;
    const index_t batch = 2, hidden = 40;
    const saa::grid_shape grid{12, 16};
    const index_t queries = grid.height * grid.width;
    auto q = testing::round_to<H>(dynamicid::matrix::host_normal(static_cast<std::size_t>(batch * queries * hidden), 9300));
    const auto keys = testing::round_to<H>(dynamicid::matrix::host_normal(static_cast<std::size_t>(batch * hidden), 9301));
    if (tied) std::fill(q.begin(), q.begin() + queries * hidden, 0.0);  // batch element 0: every query ties
    const std::vector<saa::box> boxes{{0.0, 0.0, 1.0, 0.5}, {0.25, 0.4, 0.9, 1.0}};  // overlapping columns
    const double scale = 1.0 / std::sqrt(8.0), threshold = 0.3, beta = 2.0;

    std::vector<double> sums(static_cast<std::size_t>(batch * queries));
    for (index_t b = 0; b < batch; ++b)
        for (index_t n = 0; n < queries; ++n) {
            double dot = 0;
            for (index_t i = 0; i < hidden; ++i)
                dot += q[static_cast<std::size_t>((b * queries + n) * hidden + i)] * keys[static_cast<std::size_t>(b * hidden + i)];
            sums[static_cast<std::size_t>(b * queries + n)] = scale * dot;
        }
    const auto normalized = saa::normalise_activation(sums, batch, threshold);
    auto weights = normalized;
    saa::apply_layout_boost(weights, batch, grid, boxes, beta);

    dynamicid::saa_gate_desc d{.batch = batch, .queries = queries, .hidden = hidden, .grid_height = grid.height, .grid_width = grid.width,
                               .scale = scale, .threshold = threshold, .beta = beta, .boxes = 2};
    for (std::size_t i = 0; i < boxes.size(); ++i) {
        const auto c = saa::to_cells(boxes[i], grid);
        d.cells[i] = {c.y0, c.x0, c.y1, c.x1};
    }
    const auto dq = testing::upload<cuda_backend, H>(ctx, {batch, queries, hidden}, q);
    const auto dk = testing::upload<cuda_backend, H>(ctx, {batch, hidden}, keys);
    auto gate = tensor<cuda_backend, H>::empty(ctx, {batch, queries});
    auto norm = tensor<cuda_backend, float>::empty(ctx, {batch, queries});
    cuda_backend::saa_gate(ctx, d, dq.data(), dk.data(), gate.data(), norm.data());
    testing::check_close("saa gate normalized", testing::download(ctx, norm), normalized, tol, tol);
    testing::check_close("saa gate weights", testing::download(ctx, gate), weights, tol, tol);
    if (tied) {
        const auto n = testing::download(ctx, norm);
        CHECK(std::all_of(n.begin(), n.begin() + queries, [](double v) { return v == 0.0; }));
    }
}

}  // namespace

TEST_CASE("cuda: the device SAA gate matches the host reference", "[cuda][saa]") {
    check_saa_gate<float>(false, 1e-5);
    check_saa_gate<float>(true, 1e-5);
    check_saa_gate<dynamicid::half>(false, 2e-3);
}

namespace {

/// The vectorised and tiled-transpose paths of binary ops and strided copies
/// against the reference CPU backend on the same rounded inputs.
template <class H>
void check_fast_layout_paths(double tol) {
    using dynamicid::cpu_backend;
    cuda_backend::context ctx;
    cpu_backend::context cpu;
    std::uint64_t seed = 9500;
    const auto both = [&](const dynamicid::shape& s) {
        const auto host = testing::round_to<H>(dynamicid::matrix::host_normal(static_cast<std::size_t>(s.numel()), ++seed));
        return std::pair{testing::upload<cuda_backend, H>(ctx, s, host), testing::upload<cpu_backend, H>(cpu, s, host)};
    };
    const auto same = [&](const std::string& what, const auto& gpu, const auto& ref) {
        testing::check_close(what, testing::download(ctx, gpu), testing::download(cpu, ref), tol, tol);
    };
    struct permute_case {
        dynamicid::shape s;
        std::vector<int> perm;
    };
    for (const auto& c : {permute_case{{2, 320, 1000}, {0, 2, 1}}, permute_case{{3, 37, 45}, {0, 2, 1}},
                          permute_case{{2, 77, 8, 40}, {0, 2, 1, 3}}, permute_case{{64, 48}, {1, 0}}}) {
        const auto [g, r] = both(c.s);
        same("permute " + c.s.str(), ops::permute(ctx, g, c.perm), ops::permute(cpu, r, c.perm));
    }
    struct binary_case {
        dynamicid::shape a, b;
    };
    for (const auto& c : {binary_case{{2, 64, 24, 24}, {2, 64, 24, 24}}, binary_case{{2, 64, 24, 24}, {1, 64, 1, 1}},
                          binary_case{{2, 77, 320}, {320}}, binary_case{{2, 64, 40}, {2, 64, 1}}, binary_case{{3, 5, 7}, {7}}}) {
        const auto [ga, ra] = both(c.a);
        const auto [gb, rb] = both(c.b);
        same("add " + c.a.str() + " + " + c.b.str(), ops::add(ctx, ga, gb), ops::add(cpu, ra, rb));
        same("mul " + c.b.str() + " * " + c.a.str(), ops::mul(ctx, gb, ga), ops::mul(cpu, rb, ra));
    }
}

}  // namespace

TEST_CASE("cuda: vectorised and transposing layout paths match the reference CPU backend", "[cuda][layout]") {
    check_fast_layout_paths<float>(1e-6);
    check_fast_layout_paths<dynamicid::half>(1e-3);
    check_fast_layout_paths<dynamicid::bfloat16>(1e-2);
}
