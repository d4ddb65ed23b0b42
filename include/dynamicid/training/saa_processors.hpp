// dynamicid training: DynamicID's SA / SAA processors as trainable attention
// processors of the UNet.
//
// Each attention layer keeps the UNet's frozen projections and adds its own
// trainable weights: LoRA down/up on to_q, to_k, to_v, to_out (attn1 and
// attn2) and to_k_ip / to_v_ip (attn2). The weights are registered on a
// parameter_gradients board under the released SAA_module keys
// ("<layer>.to_q_lora.down.weight", ..., "<layer>.to_k_ip.weight"), and each
// layer's backward delivers its gradients there as soon as the layer's
// backward has run.
//
//     dynamicid::training::parameter_gradients<B, float> board;
//     dynamicid::training::saa_processors<B, float> procs(std::move(layers), {.tokens_per_id = 4}, board);
//     auto hooks = procs.hooks({.id_num = 1, .activate_query = true});
//     dynamicid::training::tape<B, float> tp(&board);
//     auto eps = unet.forward_train(ctx, tp, x, timesteps, states, &hooks);
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/core/tensor.hpp>
#include <dynamicid/modules/dynamicid/saa.hpp>
#include <dynamicid/modules/unet/transformer_2d.hpp>
#include <dynamicid/training/tape.hpp>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace dynamicid::training {

/// The trainable weights of one attention layer's processor.
template <class B, class T>
struct saa_layer_weights {
    bool cross = false;  ///< attn2 (SAA processor with the identity branch) rather than attn1 (SA processor)
    modules::saa::lora_layer<B, T> to_q_lora, to_k_lora, to_v_lora, to_out_lora;
    tensor<B, T> to_k_ip, to_v_ip;  ///< cross layers only
};

/// Settings shared by every layer (fixed by the checkpoint).
struct saa_processors_config {
    index_t tokens_per_id = 4;
    double lora_scale = 1.0;
    std::optional<double> network_alpha{};
};

/// Trainable SA / SAA processors for every attention layer of a UNet.
template <class B, class T = float>
    requires computes_in<B, T>
class saa_processors {
public:
    using tensor_type = tensor<B, T>;

    /// `layers[i]` is the processor of attention layer i (diffusers attn_processors order).
    /// Registers every weight on `board`, which must outlive this object's hooks.
    saa_processors(std::vector<saa_layer_weights<B, T>> layers, saa_processors_config cfg, parameter_gradients<B, T>& board)
        : state_(std::make_shared<state>()) {
        state_->layers = std::move(layers);
        state_->cfg = cfg;
        state_->board = &board;
        for (std::size_t i = 0; i < state_->layers.size(); ++i) {
            auto& l = state_->layers[i];
            const std::string p = std::to_string(i) + ".";
            layer_ids ids;
            const auto lora = [&](const modules::saa::lora_layer<B, T>& w, const char* name, index_t* out) {
                check<value_error>(w.down.defined() && w.up.defined(), "training", "layer ", i, ": ", name, " is missing");
                out[0] = board.add(p + name + ".down.weight", w.down);
                out[1] = board.add(p + name + ".up.weight", w.up);
            };
            lora(l.to_q_lora, "to_q_lora", ids.q);
            lora(l.to_k_lora, "to_k_lora", ids.k);
            lora(l.to_v_lora, "to_v_lora", ids.v);
            lora(l.to_out_lora, "to_out_lora", ids.out);
            if (l.cross) {
                check<value_error>(l.to_k_ip.defined() && l.to_v_ip.defined(), "training", "layer ", i, ": to_k_ip / to_v_ip missing");
                ids.k_ip = board.add(p + "to_k_ip.weight", l.to_k_ip);
                ids.v_ip = board.add(p + "to_v_ip.weight", l.to_v_ip);
            }
            state_->ids.push_back(ids);
        }
    }

    std::size_t size() const noexcept { return state_->layers.size(); }
    const saa_layer_weights<B, T>& layer(std::size_t i) const { return state_->layers.at(i); }

    /// Hooks with a training processor (and the matching inference processor)
    /// on every layer. `controls.step` is replaced by hooks.step per call.
    modules::unet::attention_hooks<B, T> hooks(modules::saa::saa_controls controls = {}) const {
        modules::unet::attention_hooks<B, T> h;
        auto shared = std::make_shared<const modules::saa::saa_controls>(std::move(controls));
        for (std::size_t i = 0; i < state_->layers.size(); ++i) {
            h.training_processors.push_back([st = state_, shared, i](context_t<B>& ctx, const modules::blocks::attention_call<B, T>& call) {
                return run_train(ctx, *st, st, *shared, i, call);
            });
            h.processors.push_back([st = state_, shared, i](context_t<B>& ctx, const modules::blocks::attention_call<B, T>& call) {
                const typename parameter_gradients<B, T>::pause_guard inference(st->board);  // no backward will follow
                return run_train(ctx, *st, st, *shared, i, call).output;
            });
        }
        return h;
    }

private:
    struct layer_ids {
        index_t q[2]{}, k[2]{}, v[2]{}, out[2]{};
        index_t k_ip = -1, v_ip = -1;
    };
    struct state {
        std::vector<saa_layer_weights<B, T>> layers;
        std::vector<layer_ids> ids;
        saa_processors_config cfg;
        parameter_gradients<B, T>* board = nullptr;
    };

    static void deliver_lora(context_t<B>& ctx, parameter_gradients<B, T>& board, const index_t* id,
                             const modules::saa::lora_layer<B, T>& g) {
        board.deliver(ctx, id[0], g.down);
        board.deliver(ctx, id[1], g.up);
    }

    static modules::blocks::attention_record<B, T> run_train(context_t<B>& ctx, const state& st, std::shared_ptr<const state> keep,
                                                             const modules::saa::saa_controls& controls, std::size_t i,
                                                             const modules::blocks::attention_call<B, T>& call) {
        const auto& l = st.layers[i];
        const auto& base = call.attn.weights();
        modules::saa::lora_attention_params<B, T> p{base.to_q, base.to_k, base.to_v, base.to_out,
                                                     l.to_q_lora, l.to_k_lora, l.to_v_lora, l.to_out_lora};
        const index_t heads = call.attn.settings().heads;
        auto& board = *st.board;
        const auto& id = st.ids[i];
        for (const index_t* pair : {id.q, id.k, id.v, id.out}) {
            board.use(pair[0]);
            board.use(pair[1]);
        }
        if (!l.cross) {
            auto proc = std::make_shared<const modules::saa::sa_processor<B, T>>(
                modules::saa::lora_attention_config{heads, st.cfg.lora_scale, st.cfg.network_alpha}, std::move(p));
            auto [y, s] = proc->forward_train(ctx, call.hidden_states, call.context);
            return {y, [proc, s = std::move(s), keep, i](context_t<B>& cx, const tensor_type& g) {
                        auto d = proc->backward(cx, s, g);
                        auto& b = *keep->board;
                        const auto& id = keep->ids[i];
                        deliver_lora(cx, b, id.q, d.to_q_lora);
                        deliver_lora(cx, b, id.k, d.to_k_lora);
                        deliver_lora(cx, b, id.v, d.to_v_lora);
                        deliver_lora(cx, b, id.out, d.to_out_lora);
                        return modules::blocks::attention_input_grads<B, T>{d.hidden_states, d.encoder_hidden_states};
                    }};
        }
        check<value_error>(call.context != nullptr, "training", "layer ", call.layer, " (", call.name,
                           ") is a cross-attention layer but received no encoder states");
        board.use(id.k_ip);
        board.use(id.v_ip);
        auto proc = std::make_shared<const modules::saa::saa_processor<B, T>>(
            modules::saa::saa_config{heads, st.cfg.tokens_per_id, st.cfg.lora_scale, st.cfg.network_alpha},
            typename modules::saa::saa_processor<B, T>::params{std::move(p), l.to_k_ip, l.to_v_ip});
        auto c = controls;
        c.step = static_cast<index_t>(call.step);
        auto [y, s] = proc->forward_train(ctx, call.hidden_states, *call.context, c);
        return {y, [proc, s = std::move(s), keep, i](context_t<B>& cx, const tensor_type& g) {
                    auto d = proc->backward(cx, s, g);
                    auto& b = *keep->board;
                    const auto& id = keep->ids[i];
                    deliver_lora(cx, b, id.q, d.to_q_lora);
                    deliver_lora(cx, b, id.k, d.to_k_lora);
                    deliver_lora(cx, b, id.v, d.to_v_lora);
                    deliver_lora(cx, b, id.out, d.to_out_lora);
                    b.deliver(cx, id.k_ip, d.to_k_ip);
                    b.deliver(cx, id.v_ip, d.to_v_ip);
                    return modules::blocks::attention_input_grads<B, T>{d.hidden_states, d.encoder_hidden_states};
                }};
    }

    std::shared_ptr<state> state_;
};

}  // namespace dynamicid::training
