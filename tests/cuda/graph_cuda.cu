// step_graph on the CUDA backend: UNet evaluations recorded into CUDA graphs
// give the results of the same evaluations run normally while host inputs
// (the timesteps) change from call to call; work that must reach the host
// makes the graph fall back; an exception inside a capture leaves the
// context usable.
#include <benchmarks/random_weights.hpp>
#include <support/gradcheck.hpp>

#include <dynamicid/backends/cuda.cuh>
#include <dynamicid/modules/unet/unet_2d_condition.hpp>
#include <dynamicid/ops.hpp>

#include <catch2/catch.hpp>

#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using dynamicid::cuda_backend;
using dynamicid::index_t;
namespace ops = dynamicid::ops;
namespace unet = dynamicid::modules::unet;

/// A two-level UNet with cross-attention: convolutions (cuDNN), GEMMs
/// (cuBLAS), fused attention, norms and a host upload (the timestep features).
unet::unet_config small_unet() {
    unet::unet_config c;
    c.sample_size = 16;
    c.down_block_types = {"CrossAttnDownBlock2D", "DownBlock2D"};
    c.up_block_types = {"UpBlock2D", "CrossAttnUpBlock2D"};
    c.block_out_channels = {32, 64};
    c.layers_per_block = {1, 1};
    c.attention_head_dim = {2, 2};
    c.transformer_layers_per_block = {1, 1};
    c.cross_attention_dim = 32;
    c.norm_num_groups = 8;
    return c;
}

template <class T>
void check_graph_matches_eager(double tol) {
    cuda_backend::context ctx;
    const auto cfg = small_unet();
    using model_t = unet::unet_2d_condition<cuda_backend, T>;
    using tensor_t = dynamicid::tensor<cuda_backend, T>;
    const auto source = dynamicid::bench::random_weight_source<cuda_backend, T>(
        ctx, [&](auto& b) { (void)model_t::bind(b, cfg); }, 99);
    const auto model = model_t::load(ctx, source, cfg);
    const auto text = ops::randn<cuda_backend, T>(ctx, {2, 7, 32}, 6);
    const std::vector<float> steps{999.f, 741.f, 380.f, 21.f, 741.f, 500.f};
    // Steps 0-3 share variant 0; 4-5 use variant 1 (a second recording).
    const auto variant = [](std::size_t i) -> std::uint64_t { return i < 4 ? 0 : 1; };
    std::vector<tensor_t> latents;
    for (std::size_t i = 0; i < steps.size(); ++i) latents.push_back(ops::randn<cuda_backend, T>(ctx, {2, 4, 16, 16}, 50 + i));

    std::vector<std::vector<double>> eager;
    for (std::size_t i = 0; i < steps.size(); ++i) {
        const std::vector<float> ts{steps[i], steps[i]};
        eager.push_back(dynamicid::testing::download(ctx, model.forward(ctx, latents[i], std::span<const float>(ts), text)));
    }
    cuda_backend::step_graph graph;
    std::vector<tensor_t> outputs;
    for (std::size_t i = 0; i < steps.size(); ++i) {
        const std::vector<float> ts{steps[i], steps[i]};
        outputs.push_back(graph.run(
            ctx, variant(i), [&](const tensor_t& x, const tensor_t& f) { return model.forward_features(ctx, x, f, text); }, latents[i],
            model.time_features(ctx, ts)));
    }
    // Every result, read after all calls: each is its own copy.
    for (std::size_t i = 0; i < steps.size(); ++i)
        dynamicid::testing::check_close("step " + std::to_string(i), dynamicid::testing::download(ctx, outputs[i]), eager[i], tol, tol);
    const auto& s = graph.stats();
    INFO("fallback: " << s.fallback);
    CHECK(s.fallback.empty());
    CHECK(s.eager == 1);
    CHECK(s.recorded == 2);
    CHECK(s.replayed == 3);

    // New input shapes record again.
    const auto wide = ops::randn<cuda_backend, T>(ctx, {2, 4, 16, 32}, 70);
    const std::vector<float> ts{400.f, 400.f};
    const auto expected = dynamicid::testing::download(ctx, model.forward(ctx, wide, std::span<const float>(ts), text));
    const auto got = graph.run(
        ctx, 1, [&](const tensor_t& x, const tensor_t& f) { return model.forward_features(ctx, x, f, text); }, wide,
        model.time_features(ctx, ts));
    dynamicid::testing::check_close("new shape", dynamicid::testing::download(ctx, got), expected, tol, tol);
    CHECK(graph.stats().recorded == 3);
}

}  // namespace

TEST_CASE("cuda: step_graph gives the results of normal runs as the timesteps change (f32)", "[cuda][graph]") {
    check_graph_matches_eager<float>(1e-5);
}

TEST_CASE("cuda: step_graph gives the results of normal runs as the timesteps change (f16)", "[cuda][graph]") {
    check_graph_matches_eager<dynamicid::half>(2e-3);
}

TEST_CASE("cuda: step_graph runs a call that copies to the host without a graph", "[cuda][graph]") {
    using tensor_t = dynamicid::tensor<cuda_backend, float>;
    cuda_backend::context ctx;
    const auto x = ops::randn<cuda_backend, float>(ctx, {64}, 1);
    const auto expected = ops::scale(ctx, x, 2.0).to_host(ctx);
    const auto doubled_via_host = [&](const tensor_t& in) {
        const auto host = ops::scale(ctx, in, 2.0).to_host(ctx);
        return tensor_t::from_host(ctx, in.shape(), host);
    };
    cuda_backend::step_graph graph(0);
    CHECK(graph.run(ctx, 0, doubled_via_host, x).to_host(ctx) == expected);
    CHECK(graph.stats().eager == 1);
    CHECK(graph.stats().recorded == 0);
    CHECK(graph.stats().fallback.find("[cuda]") != std::string::npos);
    CHECK(graph.stats().fallback.find("copying to the host") != std::string::npos);
    // Later calls run normally too.
    CHECK(graph.run(ctx, 0, doubled_via_host, x).to_host(ctx) == expected);
    CHECK(graph.stats().eager == 2);
}

TEST_CASE("cuda: an exception inside a step_graph recording leaves the context usable", "[cuda][graph]") {
    using tensor_t = dynamicid::tensor<cuda_backend, float>;
    cuda_backend::context ctx;
    const auto x = ops::randn<cuda_backend, float>(ctx, {256}, 2);
    cuda_backend::step_graph graph(0);
    CHECK_THROWS_AS(graph.run(ctx, 0,
                              [&](const tensor_t& in) -> tensor_t {
                                  (void)ops::scale(ctx, in, 3.0);
                                  throw std::runtime_error("from the step");
                              },
                              x),
                    std::runtime_error);
    // Normal work and a later recording both run; a replay sees new input values.
    const auto expected = ops::scale(ctx, x, 3.0).to_host(ctx);
    const auto triple = [&](const tensor_t& in) { return ops::scale(ctx, in, 3.0); };
    CHECK(graph.run(ctx, 0, triple, x).to_host(ctx) == expected);
    const auto y = ops::randn<cuda_backend, float>(ctx, {256}, 3);
    CHECK(graph.run(ctx, 0, triple, y).to_host(ctx) == ops::scale(ctx, y, 3.0).to_host(ctx));
    CHECK(graph.stats().recorded == 1);
    CHECK(graph.stats().replayed == 1);
    CHECK(graph.stats().fallback.empty());
}
