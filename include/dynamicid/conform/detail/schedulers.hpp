// dynamicid conformance: the DDIMScheduler and DDPMScheduler.add_noise handlers.
#pragma once

#include <dynamicid/conform/detail/golden_case.hpp>
#include <dynamicid/schedulers/ddim.hpp>
#include <dynamicid/schedulers/ddpm.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace dynamicid::conform::detail {

template <class B>
tensor<B, float> host_vector(context_t<B>& ctx, const std::vector<float>& v) {
    return tensor<B, float>::from_host(ctx, shape{static_cast<index_t>(v.size())}, std::span<const float>(v));
}

/// Row i of a (T, ...) tensor as a tensor of the trailing shape (shares storage).
template <class B, class T>
tensor<B, T> row(const tensor<B, T>& stacked, index_t i) {
    auto dims = stacked.shape().to_vector();
    dims.erase(dims.begin());
    return stacked.narrow_leading(i, 1).reshape(dims);
}

/// Stacks same-shaped tensors along a new leading axis.
template <class B, class T>
tensor<B, T> stack(context_t<B>& ctx, const std::vector<tensor<B, T>>& parts) {
    std::vector<tensor<B, T>> rows;
    for (const auto& p : parts) {
        auto dims = p.shape().to_vector();
        dims.insert(dims.begin(), 1);
        rows.push_back(p.reshape(dims));
    }
    return ops::concat(ctx, rows, 0);
}

/// DDIMScheduler: config = diffusers' scheduler config + num_inference_steps,
/// eta, use_clipped_model_output; input.sample, input.model_outputs (T, ...),
/// input.noise (T, ...) when eta > 0 -> output.timesteps, output.samples,
/// output.alphas_cumprod.
template <class B>
output_map<B> ddim_scheduler_case(context_t<B>& ctx, const golden_case& g) {
    auto cfg = schedulers::ddim_config::from_json(g.config());
    cfg.eta = g.setting<double>("eta", 0.0);
    cfg.use_clipped_model_output = g.setting<bool>("use_clipped_model_output", false);
    schedulers::ddim_scheduler ddim(cfg);
    ddim.set_timesteps(g.setting<std::size_t>("num_inference_steps"));

    auto x = g.template load<B, float>(ctx, "input.sample");
    const auto model_outputs = g.template load<B, float>(ctx, "input.model_outputs");
    const auto noise = g.has("input.noise") ? g.template load<B, float>(ctx, "input.noise") : tensor<B, float>{};
    const auto& ts = ddim.timesteps();
    check<shape_error>(model_outputs.dim(0) >= static_cast<index_t>(ts.size()), "conform", g.file_name(), ": ", model_outputs.dim(0),
                       " model outputs for ", ts.size(), " timesteps");
    std::vector<tensor<B, float>> samples;
    for (std::size_t i = 0; i < ts.size(); ++i) {
        const auto n = noise.defined() ? schedulers::step_noise<B, float>::from(row(noise, static_cast<index_t>(i)))
                                       : schedulers::step_noise<B, float>{};
        x = ddim.step(ctx, row(model_outputs, static_cast<index_t>(i)), ts[i], x, n);
        samples.push_back(x);
    }
    output_map<B> out;
    out.insert_or_assign("timesteps", any_tensor<B>(host_vector<B>(ctx, std::vector<float>(ts.begin(), ts.end()))));
    out.insert_or_assign("samples", any_tensor<B>(stack(ctx, samples)));
    out.insert_or_assign("alphas_cumprod", any_tensor<B>(host_vector<B>(ctx, ddim.alphas_cumprod())));
    return out;
}

/// DDPMScheduler.add_noise: input.original_samples, input.noise, input.timesteps (B)
/// -> output.noisy_samples, output.velocity, output.alphas_cumprod.
template <class B>
output_map<B> ddpm_add_noise_case(context_t<B>& ctx, const golden_case& g) {
    const auto sched = schedulers::ddpm_schedule::from_json(g.config());
    const auto x0 = g.template load<B, float>(ctx, "input.original_samples");
    const auto noise = g.template load<B, float>(ctx, "input.noise");
    std::vector<std::int64_t> t;
    for (double v : g.values("input.timesteps")) t.push_back(static_cast<std::int64_t>(v));
    output_map<B> out;
    out.insert_or_assign("noisy_samples", any_tensor<B>(sched.add_noise(ctx, x0, noise, std::span<const std::int64_t>(t))));
    out.insert_or_assign("velocity", any_tensor<B>(sched.velocity(ctx, x0, noise, std::span<const std::int64_t>(t))));
    out.insert_or_assign("alphas_cumprod", any_tensor<B>(host_vector<B>(ctx, sched.alphas_cumprod())));
    return out;
}

}  // namespace dynamicid::conform::detail
