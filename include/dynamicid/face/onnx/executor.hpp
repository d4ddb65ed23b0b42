// dynamicid face: running an ONNX graph on a dynamicid backend.
//
// Float tensors live on the backend and go through its primitives
// (convolution, GEMM, pointwise and broadcasting ops, softmax, permute,
// concat, upsampling); integer tensors (shapes, indices) stay on the host.
// Small data-movement ops the backend has no primitive for (general slice,
// gather, pooling, non-integer nearest resize) run on the host copy.
//
// Everything that can be checked without data is checked when the executor
// is built: an operator outside the supported set, or an attribute value it
// does not implement, is an unsupported_error naming the node. Conv followed
// by BatchNormalization on weights known at load is folded into one Conv.
//
//     B::context ctx;
//     dynamicid::face::onnx::executor<B> net(ctx, dynamicid::face::onnx::read_model("w600k_r50.onnx"));
//     auto emb = net.run(ctx, {input})[0];   // input: tensor<B, float> (1, 3, 112, 112)
#pragma once

#include <dynamicid/core/tensor.hpp>
#include <dynamicid/face/onnx/graph.hpp>
#include <dynamicid/ops.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace dynamicid::face::onnx {

/// The operators the executor implements (default ONNX domain).
inline const std::set<std::string>& supported_operators() {
    static const std::set<std::string> ops{
        "Abs",       "Add",       "AveragePool", "BatchNormalization", "Cast",    "Concat",  "Constant", "Conv",      "Div",
        "Flatten",   "Gather",      "Gemm",               "GlobalAveragePool",  "Identity", "LeakyRelu", "MatMul",
        "MaxPool",   "Mul",         "PRelu",              "Relu",    "Reshape", "Resize",   "Shape",     "Sigmoid",
        "Slice",     "Softmax",     "Sub",                "Transpose", "Unsqueeze", "Upsample"};
    return ops;
}

namespace detail {

inline constexpr std::string_view exec_component = "onnx";

inline std::int64_t product(const std::vector<std::int64_t>& d, std::size_t from = 0, std::size_t to = SIZE_MAX) {
    const auto end = d.begin() + static_cast<std::ptrdiff_t>(std::min(to, d.size()));
    const auto begin = d.begin() + static_cast<std::ptrdiff_t>(std::min(from, d.size()));
    std::int64_t n = 1;
    for (auto it = begin; it < end; ++it) n *= *it;
    return n;
}

inline std::string dims_str(const std::vector<std::int64_t>& d) {
    std::string s = "(";
    for (std::size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
    return s + ")";
}

// Numpy broadcasting of two shapes; shape_error when they do not broadcast.
inline std::vector<std::int64_t> broadcast(const std::vector<std::int64_t>& a, const std::vector<std::int64_t>& b,
                                           const std::string& who) {
    const auto r = std::max(a.size(), b.size());
    std::vector<std::int64_t> out(r);
    for (std::size_t i = 0; i < r; ++i) {
        const auto da = i + a.size() >= r ? a[i + a.size() - r] : 1;
        const auto db = i + b.size() >= r ? b[i + b.size() - r] : 1;
        check<shape_error>(da == db || da == 1 || db == 1, exec_component, who, ": shapes ", dims_str(a), " and ", dims_str(b),
                           " do not broadcast");
        out[i] = da == 1 ? db : da;
    }
    return out;
}

// For each output element, the flat index into an operand of shape `in` broadcast to `out`.
inline std::vector<std::int64_t> broadcast_map(const std::vector<std::int64_t>& in, const std::vector<std::int64_t>& out) {
    const auto n = product(out);
    std::vector<std::int64_t> map(static_cast<std::size_t>(n));
    const auto r = out.size();
    std::vector<std::int64_t> stride(r, 0);
    std::int64_t s = 1;
    for (std::size_t i = in.size(); i-- > 0;) {
        const auto oi = i + r - in.size();
        stride[oi] = in[i] == 1 ? 0 : s;
        s *= in[i];
    }
    std::vector<std::int64_t> idx(r, 0);
    for (std::int64_t k = 0; k < n; ++k) {
        std::int64_t off = 0;
        for (std::size_t i = 0; i < r; ++i) off += idx[i] * stride[i];
        map[static_cast<std::size_t>(k)] = off;
        for (std::size_t i = r; i-- > 0;) {
            if (++idx[i] < out[i]) break;
            idx[i] = 0;
        }
    }
    return map;
}

inline std::int64_t normalise_axis(std::int64_t axis, std::size_t rank, const std::string& who) {
    const auto r = static_cast<std::int64_t>(rank);
    check<shape_error>(axis >= -r && axis < r, exec_component, who, ": axis ", axis, " out of range for rank ", rank);
    return axis < 0 ? axis + r : axis;
}

}  // namespace detail

/// An ONNX graph bound to backend B, ready to run.
template <class B>
class executor {
public:
    using ftensor = tensor<B, float>;

    /// A runtime value: floats on the backend, integers on the host.
    struct value {
        element_type type = element_type::f32;
        std::vector<std::int64_t> dims;
        ftensor f;                     ///< f32 values (shape dims, or (1) for a scalar)
        std::vector<std::int64_t> i;   ///< integer values
    };

    executor(context_t<B>& ctx, const model& m) : opset_(m.opset), inputs_(m.graph.inputs), outputs_(m.graph.outputs) {
        nodes_ = m.graph.nodes;
        for (const auto& t : m.graph.initializers) host_init_[t.name] = &t;
        validate(m);
        fold_batch_norm();
        const auto used = used_names();
        for (const auto& t : m.graph.initializers)
            if (used.count(t.name)) constants_[t.name] = from_host(ctx, t);
        for (const auto& t : folded_) constants_[t.name] = from_host(ctx, t);
        folded_.clear();
        host_init_.clear();
        count_uses();
    }

    const std::vector<value_info>& inputs() const { return inputs_; }
    const std::vector<value_info>& outputs() const { return outputs_; }
    std::int64_t opset() const { return opset_; }
    /// Nodes after BatchNormalization folding.
    std::size_t node_count() const { return nodes_.size(); }

    /// Runs the graph on float inputs (in the order of inputs()); returns the float outputs.
    std::vector<ftensor> run(context_t<B>& ctx, const std::vector<ftensor>& in) {
        std::vector<value> vs;
        for (const auto& t : in) {
            value v;
            v.dims.assign(t.shape().begin(), t.shape().end());
            v.f = t;
            vs.push_back(std::move(v));
        }
        auto outs = run_values(ctx, std::move(vs));
        std::vector<ftensor> result;
        for (std::size_t k = 0; k < outs.size(); ++k) {
            check<value_error>(outs[k].type == element_type::f32, exec_component(), "output '", outputs_[k].name, "' is ",
                               name_of(outs[k].type), ", not float32");
            result.push_back(outs[k].f.reshape(outs[k].dims.empty() ? std::vector<index_t>{1} : outs[k].dims));
        }
        return result;
    }

    /// Runs the graph on host tensors of any supported type.
    std::vector<host_tensor> run_host(context_t<B>& ctx, const std::vector<host_tensor>& in) {
        std::vector<value> vs;
        for (const auto& t : in) vs.push_back(from_host(ctx, t));
        auto outs = run_values(ctx, std::move(vs));
        std::vector<host_tensor> result;
        for (std::size_t k = 0; k < outs.size(); ++k) {
            host_tensor h{outputs_[k].name, outs[k].type, outs[k].dims, {}, {}};
            if (is_float(outs[k].type)) h.f32 = outs[k].f.to_host(ctx);
            else h.i64 = outs[k].i;
            if (is_float(h.type)) h.f32.resize(static_cast<std::size_t>(h.numel()));
            result.push_back(std::move(h));
        }
        return result;
    }

    std::vector<value> run_values(context_t<B>& ctx, std::vector<value> in) {
        check<value_error>(in.size() == inputs_.size(), exec_component(), "the graph takes ", inputs_.size(), " inputs, got ",
                           in.size());
        std::unordered_map<std::string, value> env;
        std::unordered_map<std::string, int> remaining = uses_;
        for (std::size_t k = 0; k < in.size(); ++k) {
            const auto& info = inputs_[k];
            if (info.type)
                check<value_error>(*info.type == in[k].type || (!is_float(*info.type) && !is_float(in[k].type)), exec_component(),
                                   "input '", info.name, "' must be ", name_of(*info.type), ", got ", name_of(in[k].type));
            if (info.dims.size())
                check<shape_error>(info.dims.size() == in[k].dims.size(), exec_component(), "input '", info.name, "' must have rank ",
                                   info.dims.size(), ", got ", detail::dims_str(in[k].dims));
            for (std::size_t d = 0; d < info.dims.size(); ++d)
                check<shape_error>(info.dims[d] < 0 || info.dims[d] == in[k].dims[d], exec_component(), "input '", info.name,
                                   "' must have shape ", detail::dims_str(info.dims), ", got ", detail::dims_str(in[k].dims));
            if (is_float(in[k].type)) check_finite(ctx, in[k], info.name);
            env[info.name] = std::move(in[k]);
        }
        for (const auto& n : nodes_) {
            std::vector<const value*> args;
            for (const auto& name : n.inputs) {
                if (name.empty()) { args.push_back(nullptr); continue; }
                if (auto c = constants_.find(name); c != constants_.end()) args.push_back(&c->second);
                else args.push_back(&env.at(name));
            }
            auto results = execute(ctx, n, args);
            for (const auto& name : n.inputs)
                if (!name.empty() && !constants_.count(name) && --remaining[name] == 0) env.erase(name);
            for (std::size_t k = 0; k < n.outputs.size() && k < results.size(); ++k)
                if (!n.outputs[k].empty()) env[n.outputs[k]] = std::move(results[k]);
        }
        std::vector<value> outs;
        for (const auto& o : outputs_) {
            if (auto c = constants_.find(o.name); c != constants_.end()) outs.push_back(c->second);
            else outs.push_back(env.at(o.name));
        }
        return outs;
    }

private:
    static std::string_view exec_component() { return detail::exec_component; }

    // ---- conversions -------------------------------------------------------------
    static value from_host(context_t<B>& ctx, const host_tensor& t) {
        value v;
        v.type = t.type;
        v.dims = t.dims;
        if (is_float(t.type)) {
            check<shape_error>(static_cast<std::int64_t>(t.f32.size()) == t.numel(), exec_component(), "tensor '", t.name, "' has ",
                               t.f32.size(), " values for dims ", detail::dims_str(t.dims));
            v.f = make_float(ctx, t.dims, t.f32);
        } else {
            check<shape_error>(static_cast<std::int64_t>(t.i64.size()) == t.numel(), exec_component(), "tensor '", t.name, "' has ",
                               t.i64.size(), " values for dims ", detail::dims_str(t.dims));
            v.i = t.i64;
        }
        return v;
    }
    static ftensor make_float(context_t<B>& ctx, const std::vector<std::int64_t>& dims, const std::vector<float>& values) {
        return ftensor::from_host(ctx, backend_shape(dims), std::span<const float>(values));
    }
    static shape backend_shape(const std::vector<std::int64_t>& dims) {
        check<shape_error>(dims.size() <= static_cast<std::size_t>(max_rank), exec_component(), "rank ", dims.size(), " is over ", max_rank);
        return dims.empty() ? shape{1} : shape(dims);
    }
    static value make_value(context_t<B>& ctx, element_type type, std::vector<std::int64_t> dims, const std::vector<float>& f,
                            std::vector<std::int64_t> i = {}) {
        value v;
        v.type = type;
        v.dims = std::move(dims);
        if (is_float(type)) v.f = make_float(ctx, v.dims, f);
        else v.i = std::move(i);
        return v;
    }
    static value wrap(ftensor t, std::vector<std::int64_t> dims) {
        value v;
        v.dims = std::move(dims);
        v.f = std::move(t);
        return v;
    }
    static ftensor as(const value& v) { return v.f.reshape(v.dims.empty() ? std::vector<index_t>{1} : v.dims); }
    static std::vector<float> host_floats(context_t<B>& ctx, const value& v) {
        auto h = v.f.to_host(ctx);
        h.resize(static_cast<std::size_t>(detail::product(v.dims)));
        return h;
    }
    // Values of any type as doubles (for shape-like arithmetic on either type).
    static std::vector<double> host_numbers(context_t<B>& ctx, const value& v) {
        if (is_float(v.type)) {
            auto f = host_floats(ctx, v);
            return {f.begin(), f.end()};
        }
        return {v.i.begin(), v.i.end()};
    }
    static std::vector<std::int64_t> ints_of(const value* v, const node& n, const char* what) {
        check<value_error>(v != nullptr, exec_component(), node_label(n), ": input '", what, "' is missing");
        check<value_error>(!is_float(v->type), exec_component(), node_label(n), ": '", what, "' must be an integer tensor");
        return v->i;
    }
    static std::string node_label(const node& n) {
        return n.op_type + " node '" + (n.name.empty() ? (n.outputs.empty() ? std::string("?") : n.outputs[0]) : n.name) + "'";
    }
    static void check_finite(context_t<B>& ctx, const value& v, const std::string& name) {
        for (float x : host_floats(ctx, v))
            check<value_error>(std::isfinite(x), exec_component(), "input '", name, "' contains NaN or infinity");
    }

    // ---- load-time checks and rewrites ------------------------------------------------
    void validate(const model& m) {
        std::set<std::string> unsupported;
        for (const auto& n : nodes_) {
            if (!(n.domain.empty() || n.domain == "ai.onnx") || !supported_operators().count(n.op_type)) {
                unsupported.insert(n.domain.empty() ? n.op_type : n.domain + "." + n.op_type);
                continue;
            }
            validate_node(n);
        }
        if (!unsupported.empty()) {
            std::string list;
            for (const auto& u : unsupported) list += (list.empty() ? "" : ", ") + u;
            throw unsupported_error(exec_component(), "graph '" + m.graph.name + "' uses operators this executor does not implement: " + list);
        }
    }

    void validate_node(const node& n) {
        auto fail = [&](const std::string& why) { throw unsupported_error(exec_component(), node_label(n) + ": " + why); };
        const auto& op = n.op_type;
        if (op == "Conv" || op == "MaxPool" || op == "AveragePool") {
            const auto k = n.attr_ints("kernel_shape");
            if (!k.empty() && k.size() != 2) fail("only 2-D kernels are supported, got " + std::to_string(k.size()) + "-D");
            if (op == "Conv" && k.empty() && host_init_.count(n.input(1)) && host_init_.at(n.input(1))->dims.size() != 4)
                fail("only 2-D convolutions are supported");
            const auto pad = n.attr_string("auto_pad", "NOTSET");
            if (pad != "NOTSET" && pad != "SAME_UPPER" && pad != "SAME_LOWER" && pad != "VALID") fail("auto_pad " + pad);
            if (op == "MaxPool" && (n.outputs.size() > 1 || n.attr_int("storage_order", 0) != 0)) fail("MaxPool indices output");
        } else if (op == "BatchNormalization") {
            if (n.attr_int("training_mode", 0) != 0 || n.outputs.size() > 1) fail("training mode");
        } else if (op == "Resize" || op == "Upsample") {
            if (n.attr_string("mode", "nearest") != "nearest") fail("mode '" + n.attr_string("mode", "") + "' (only nearest)");
            const auto ct = n.attr_string("coordinate_transformation_mode", "half_pixel");
            if (ct != "half_pixel" && ct != "asymmetric" && ct != "align_corners" && ct != "pytorch_half_pixel" &&
                ct != "tf_half_pixel_for_nn")
                fail("coordinate_transformation_mode " + ct);
            const auto nm = n.attr_string("nearest_mode", "round_prefer_floor");
            if (nm != "round_prefer_floor" && nm != "round_prefer_ceil" && nm != "floor" && nm != "ceil") fail("nearest_mode " + nm);
        } else if (op == "Cast") {
            const auto to = n.attr_int("to", 0);
            using TP = int;
            static const std::set<TP> ok{1, 2, 3, 6, 7, 9};
            if (!ok.count(static_cast<TP>(to))) fail("cast to ONNX element type " + std::to_string(to));
        } else if (op == "Constant") {
            if (!n.find("value") && !n.find("value_float") && !n.find("value_floats") && !n.find("value_int") && !n.find("value_ints"))
                fail("only value, value_float(s) and value_int(s) constants");
        } else if (op == "Gemm") {
            // all attributes supported
        }
    }

    // Conv -> BatchNormalization with known weights becomes one Conv.
    void fold_batch_norm() {
        std::unordered_map<std::string, int> consumers;
        for (const auto& n : nodes_)
            for (const auto& i : n.inputs) ++consumers[i];
        for (const auto& o : outputs_) ++consumers[o.name];
        std::vector<node> out;
        std::vector<bool> drop(nodes_.size(), false);
        std::unordered_map<std::string, std::size_t> producer;
        for (std::size_t k = 0; k < nodes_.size(); ++k)
            for (const auto& o : nodes_[k].outputs) producer[o] = k;
        for (std::size_t k = 0; k < nodes_.size(); ++k) {
            auto& bn = nodes_[k];
            if (bn.op_type != "BatchNormalization") continue;
            auto p = producer.find(bn.input(0));
            if (p == producer.end()) continue;
            auto& conv = nodes_[p->second];
            if (conv.op_type != "Conv" || consumers[bn.input(0)] != 1) continue;
            const host_tensor* w = init(conv.input(1));
            const host_tensor* cb = conv.input(2).empty() ? nullptr : init(conv.input(2));
            const host_tensor *g = init(bn.input(1)), *b = init(bn.input(2)), *mu = init(bn.input(3)), *var = init(bn.input(4));
            if (!w || !g || !b || !mu || !var || (!conv.input(2).empty() && !cb) || !is_float(w->type) || w->dims.empty()) continue;
            const auto c_out = w->dims[0];
            auto sized = [&](const host_tensor* t) { return t && is_float(t->type) && t->numel() == c_out; };
            if (!sized(g) || !sized(b) || !sized(mu) || !sized(var) || (cb && !sized(cb))) continue;
            const double eps = bn.attr_float("epsilon", 1e-5f);
            host_tensor nw = *w, nb;
            nw.name = conv.input(1) + "#folded" + std::to_string(k);
            nb.name = nw.name + ".bias";
            nb.dims = {c_out};
            nb.f32.resize(static_cast<std::size_t>(c_out));
            const auto per = w->numel() / c_out;
            for (std::int64_t c = 0; c < c_out; ++c) {
                const auto ci = static_cast<std::size_t>(c);
                const double s = g->f32[ci] / std::sqrt(static_cast<double>(var->f32[ci]) + eps);
                for (std::int64_t j = 0; j < per; ++j) {
                    auto& x = nw.f32[static_cast<std::size_t>(c * per + j)];
                    x = static_cast<float>(x * s);
                }
                const double bias = cb ? cb->f32[ci] : 0.0;
                nb.f32[ci] = static_cast<float>((bias - mu->f32[ci]) * s + b->f32[ci]);
            }
            folded_.push_back(std::move(nw));
            folded_.push_back(std::move(nb));
            host_init_[folded_[folded_.size() - 2].name] = nullptr;  // names only; values uploaded below
            conv.inputs.resize(3);
            conv.inputs[1] = folded_[folded_.size() - 2].name;
            conv.inputs[2] = folded_.back().name;
            conv.outputs[0] = bn.outputs[0];
            drop[k] = true;
        }
        for (std::size_t k = 0; k < nodes_.size(); ++k)
            if (!drop[k]) out.push_back(std::move(nodes_[k]));
        nodes_ = std::move(out);
    }

    const host_tensor* init(const std::string& name) const {
        auto it = host_init_.find(name);
        return it == host_init_.end() ? nullptr : it->second;
    }

    void count_uses() {
        for (const auto& n : nodes_)
            for (const auto& i : n.inputs)
                if (!i.empty()) ++uses_[i];
        for (const auto& o : outputs_) ++uses_[o.name];
    }

    std::set<std::string> used_names() const {
        std::set<std::string> s;
        for (const auto& n : nodes_)
            for (const auto& i : n.inputs) s.insert(i);
        for (const auto& o : outputs_) s.insert(o.name);
        return s;
    }

    // ---- the operators -------------------------------------------------------------------
    std::vector<value> execute(context_t<B>& ctx, const node& n, const std::vector<const value*>& a) {
        auto need = [&](std::size_t k) -> const value& {
            check<value_error>(k < a.size() && a[k] != nullptr, exec_component(), node_label(n), ": input ", k, " is missing");
            return *a[k];
        };
        auto need_float = [&](std::size_t k) -> const value& {
            const auto& v = need(k);
            check<value_error>(is_float(v.type), exec_component(), node_label(n), ": input ", k, " must be float32, got ", name_of(v.type));
            return v;
        };
        const auto& op = n.op_type;
        if (op == "Identity") return {need(0)};
        if (op == "Conv") return {conv(ctx, n, need_float(0), need_float(1), a.size() > 2 ? a[2] : nullptr)};
        if (op == "BatchNormalization") return {batch_norm(ctx, n, need_float(0), need_float(1), need_float(2), need_float(3), need_float(4))};
        if (op == "Abs") {
            auto xt = as(need_float(0));
            return {wrap(ops::binary(ctx, binary_op::maximum, xt, ops::scale(ctx, xt, -1.0)), need(0).dims)};
        }
        if (op == "Relu") return {wrap(ops::relu(ctx, as(need_float(0))), need(0).dims)};
        if (op == "Sigmoid") return {wrap(ops::unary(ctx, unary_op::sigmoid, as(need_float(0))), need(0).dims)};
        if (op == "LeakyRelu") {
            const auto& x = need_float(0);
            auto slope = make_float(ctx, {1}, {n.attr_float("alpha", 0.01f)});
            return {leaky(ctx, x, slope, x.dims)};
        }
        if (op == "PRelu") {
            const auto& x = need_float(0);
            const auto& s = need_float(1);
            auto out_dims = detail::broadcast(x.dims, s.dims, node_label(n));
            return {leaky(ctx, x, as(s), out_dims)};
        }
        if (op == "Add" || op == "Sub" || op == "Mul" || op == "Div") return {binary(ctx, n, need(0), need(1))};
        if (op == "Gemm") return {gemm(ctx, n, need_float(0), need_float(1), a.size() > 2 ? a[2] : nullptr)};
        if (op == "MatMul") return {matmul(ctx, n, need_float(0), need_float(1))};
        if (op == "Flatten") {
            const auto& x = need(0);
            auto axis = n.attr_int("axis", 1);
            const auto r = static_cast<std::int64_t>(x.dims.size());
            check<shape_error>(axis >= -r && axis <= r, exec_component(), node_label(n), ": axis ", axis, " out of range for rank ", r);
            if (axis < 0) axis += r;
            return {reshaped(x, {detail::product(x.dims, 0, static_cast<std::size_t>(axis)), detail::product(x.dims, static_cast<std::size_t>(axis))})};
        }
        if (op == "Reshape") return {reshape(n, need(0), ints_of(a.size() > 1 ? a[1] : nullptr, n, "shape"))};
        if (op == "Unsqueeze") {
            const auto& x = need(0);
            auto axes = opset_ >= 13 ? ints_of(a.size() > 1 ? a[1] : nullptr, n, "axes") : n.attr_ints("axes");
            const auto r = x.dims.size() + axes.size();
            for (auto& ax : axes) ax = detail::normalise_axis(ax, r, node_label(n));
            std::sort(axes.begin(), axes.end());
            std::vector<std::int64_t> dims;
            std::size_t src = 0, k = 0;
            for (std::size_t d = 0; d < r; ++d) {
                if (k < axes.size() && axes[k] == static_cast<std::int64_t>(d)) {
                    dims.push_back(1);
                    ++k;
                } else {
                    check<shape_error>(src < x.dims.size(), exec_component(), node_label(n), ": repeated axes");
                    dims.push_back(x.dims[src++]);
                }
            }
            return {reshaped(x, dims)};
        }
        if (op == "Transpose") return {transpose(ctx, n, need(0))};
        if (op == "Concat") return {concat(ctx, n, a)};
        if (op == "Slice") return {slice(ctx, n, a)};
        if (op == "Resize" || op == "Upsample") return {resize(ctx, n, a)};
        if (op == "MaxPool" || op == "AveragePool") return {pool(ctx, n, need_float(0))};
        if (op == "GlobalAveragePool") {
            const auto& x = need_float(0);
            check<shape_error>(x.dims.size() >= 3, exec_component(), node_label(n), ": needs rank >= 3");
            std::vector<int> axes;
            auto dims = x.dims;
            for (std::size_t d = 2; d < x.dims.size(); ++d) {
                axes.push_back(static_cast<int>(d));
                dims[d] = 1;
            }
            return {wrap(ops::mean(ctx, as(x), axes), dims)};
        }
        if (op == "Softmax") return {softmax(ctx, n, need_float(0))};
        if (op == "Shape") {
            const auto& x = need(0);
            const auto r = static_cast<std::int64_t>(x.dims.size());
            auto clampi = [&](std::int64_t v) { return std::clamp(v < 0 ? v + r : v, std::int64_t{0}, r); };
            const auto s = clampi(n.attr_int("start", 0)), e = clampi(n.attr_int("end", r));
            std::vector<std::int64_t> d(x.dims.begin() + s, x.dims.begin() + std::max(s, e));
            const auto len = static_cast<std::int64_t>(d.size());
            return {make_value(ctx, element_type::i64, {len}, {}, d)};
        }
        if (op == "Gather") return {gather(ctx, n, need(0), need(1))};
        if (op == "Cast") return {cast(ctx, n, need(0))};
        if (op == "Constant") return {constant(ctx, n)};
        throw unsupported_error(exec_component(), node_label(n) + ": not implemented");
    }

    static value reshaped(const value& x, std::vector<std::int64_t> dims) {
        value v = x;
        v.dims = std::move(dims);
        if (is_float(v.type)) v.f = as(x).reshape(v.dims.empty() ? std::vector<index_t>{1} : v.dims);
        return v;
    }

    value reshape(const node& n, const value& x, const std::vector<std::int64_t>& spec) {
        const bool allowzero = n.attr_int("allowzero", 0) != 0;
        std::vector<std::int64_t> dims(spec.size());
        int infer = -1;
        std::int64_t known = 1;
        for (std::size_t k = 0; k < spec.size(); ++k) {
            auto d = spec[k];
            if (d == 0 && !allowzero) {
                check<shape_error>(k < x.dims.size(), exec_component(), node_label(n), ": 0 at axis ", k, " beyond the input's rank");
                d = x.dims[k];
            }
            if (d == -1) {
                check<shape_error>(infer < 0, exec_component(), node_label(n), ": more than one -1");
                infer = static_cast<int>(k);
                continue;
            }
            check<shape_error>(d >= 0, exec_component(), node_label(n), ": bad dimension ", d);
            dims[k] = d;
            known *= d;
        }
        const auto total = detail::product(x.dims);
        if (infer >= 0) {
            check<shape_error>(known > 0 && total % known == 0, exec_component(), node_label(n), ": cannot infer -1 reshaping ",
                               detail::dims_str(x.dims));
            dims[static_cast<std::size_t>(infer)] = total / known;
        } else {
            check<shape_error>(known == total, exec_component(), node_label(n), ": cannot reshape ", detail::dims_str(x.dims), " to ",
                               detail::dims_str(dims));
        }
        return reshaped(x, dims);
    }

    value conv(context_t<B>& ctx, const node& n, const value& x, const value& w, const value* bias) {
        check<shape_error>(x.dims.size() == 4 && w.dims.size() == 4, exec_component(), node_label(n),
                           ": needs NCHW input and 4-D weight, got ", detail::dims_str(x.dims), " and ", detail::dims_str(w.dims));
        const auto group = n.attr_int("group", 1);
        const auto strides = n.attr_ints("strides", {1, 1});
        const auto dil = n.attr_ints("dilations", {1, 1});
        check<shape_error>(strides.size() == 2 && dil.size() == 2 && group >= 1 && x.dims[1] == w.dims[1] * group && w.dims[0] % group == 0,
                           exec_component(), node_label(n), ": input ", detail::dims_str(x.dims), " does not fit weight ",
                           detail::dims_str(w.dims), " with group ", group);
        auto pads = spatial_pads(n, x.dims, {w.dims[2], w.dims[3]}, strides, dil);
        ftensor input = as(x);
        std::vector<std::int64_t> in_dims = x.dims;
        if (pads[0] != pads[2] || pads[1] != pads[3]) {
            auto host = host_floats(ctx, x);
            auto padded = pad_host(host, x.dims, pads, 0.0f);
            in_dims = {x.dims[0], x.dims[1], x.dims[2] + pads[0] + pads[2], x.dims[3] + pads[1] + pads[3]};
            input = make_float(ctx, in_dims, padded);
            pads = {0, 0, 0, 0};
        }
        conv2d_desc d{.n = in_dims[0], .c_in = in_dims[1], .h = in_dims[2], .w = in_dims[3], .c_out = w.dims[0], .kh = w.dims[2],
                      .kw = w.dims[3], .stride_h = strides[0], .stride_w = strides[1], .pad_h = pads[0], .pad_w = pads[1],
                      .dilation_h = dil[0], .dilation_w = dil[1], .groups = group};
        check<shape_error>(d.out_h() > 0 && d.out_w() > 0, exec_component(), node_label(n), ": empty output for input ", detail::dims_str(x.dims));
        ftensor b;
        if (bias) {
            check<shape_error>(is_float(bias->type) && detail::product(bias->dims) == d.c_out, exec_component(), node_label(n), ": bias ",
                               detail::dims_str(bias->dims), " for ", d.c_out, " output channels");
            b = as(*bias);
        }
        std::vector<std::int64_t> out_dims{d.n, d.c_out, d.out_h(), d.out_w()};
        auto y = ftensor::empty(ctx, shape(out_dims));
        B::conv2d_forward(ctx, d, input.data(), as(w).data(), bias ? const_pointer_t<B, float>(b.data()) : const_pointer_t<B, float>{},
                          y.data());
        return wrap(y, out_dims);
    }

    // (top, left, bottom, right) from pads / auto_pad.
    static std::vector<std::int64_t> spatial_pads(const node& n, const std::vector<std::int64_t>& xd, std::vector<std::int64_t> kernel,
                                                  const std::vector<std::int64_t>& strides, const std::vector<std::int64_t>& dil) {
        const auto mode = n.attr_string("auto_pad", "NOTSET");
        if (mode == "VALID") return {0, 0, 0, 0};
        if (mode == "SAME_UPPER" || mode == "SAME_LOWER") {
            std::vector<std::int64_t> p(4);
            for (int k = 0; k < 2; ++k) {
                const auto in = xd[static_cast<std::size_t>(2 + k)];
                const auto out = (in + strides[static_cast<std::size_t>(k)] - 1) / strides[static_cast<std::size_t>(k)];
                const auto eff = (kernel[static_cast<std::size_t>(k)] - 1) * dil[static_cast<std::size_t>(k)] + 1;
                const auto total = std::max<std::int64_t>(0, (out - 1) * strides[static_cast<std::size_t>(k)] + eff - in);
                const auto small = total / 2, big = total - small;
                p[static_cast<std::size_t>(k)] = mode == "SAME_UPPER" ? small : big;
                p[static_cast<std::size_t>(k + 2)] = mode == "SAME_UPPER" ? big : small;
            }
            return p;
        }
        auto p = n.attr_ints("pads", {0, 0, 0, 0});
        check<shape_error>(p.size() == 4, exec_component(), node_label(n), ": pads needs 4 values for 2-D, got ", p.size());
        for (auto v : p) check<shape_error>(v >= 0, exec_component(), node_label(n), ": negative pad");
        return p;
    }

    static std::vector<float> pad_host(const std::vector<float>& x, const std::vector<std::int64_t>& d, const std::vector<std::int64_t>& p,
                                       float fill) {
        const auto H = d[2] + p[0] + p[2], W = d[3] + p[1] + p[3];
        std::vector<float> out(static_cast<std::size_t>(d[0] * d[1] * H * W), fill);
        for (std::int64_t nc = 0; nc < d[0] * d[1]; ++nc)
            for (std::int64_t y = 0; y < d[2]; ++y)
                std::copy_n(x.begin() + (nc * d[2] + y) * d[3], d[3], out.begin() + (nc * H + y + p[0]) * W + p[1]);
        return out;
    }

    value batch_norm(context_t<B>& ctx, const node& n, const value& x, const value& g, const value& b, const value& mu, const value& var) {
        check<shape_error>(x.dims.size() >= 2, exec_component(), node_label(n), ": needs rank >= 2");
        const auto c = x.dims[1];
        for (const value* p : {&g, &b, &mu, &var})
            check<shape_error>(detail::product(p->dims) == c, exec_component(), node_label(n), ": parameter of shape ",
                               detail::dims_str(p->dims), " for ", c, " channels");
        const double eps = n.attr_float("epsilon", 1e-5f);
        auto hg = host_floats(ctx, g), hb = host_floats(ctx, b), hm = host_floats(ctx, mu), hv = host_floats(ctx, var);
        std::vector<float> scale(static_cast<std::size_t>(c)), shift(static_cast<std::size_t>(c));
        for (std::size_t k = 0; k < scale.size(); ++k) {
            const double s = hg[k] / std::sqrt(static_cast<double>(hv[k]) + eps);
            scale[k] = static_cast<float>(s);
            shift[k] = static_cast<float>(hb[k] - hm[k] * s);
        }
        std::vector<std::int64_t> pd(x.dims.size(), 1);
        pd[1] = c;
        auto y = ops::mul(ctx, as(x), make_float(ctx, pd, scale));
        return wrap(ops::add(ctx, y, make_float(ctx, pd, shift)), x.dims);
    }

    // max(x, 0) + slope * min(x, 0), slope broadcast against x.
    value leaky(context_t<B>& ctx, const value& x, const ftensor& slope, const std::vector<std::int64_t>& out_dims) {
        auto xt = as(x);
        auto zero = make_float(ctx, {1}, {0.0f});
        auto pos = ops::binary(ctx, binary_op::maximum, xt, zero);
        auto neg = ops::binary(ctx, binary_op::minimum, xt, zero);
        auto y = ops::add(ctx, pos, ops::mul(ctx, neg, slope));
        return wrap(y.reshape(out_dims.empty() ? std::vector<index_t>{1} : out_dims), out_dims);
    }

    value binary(context_t<B>& ctx, const node& n, const value& x, const value& y) {
        const auto out = detail::broadcast(x.dims, y.dims, node_label(n));
        const auto& op = n.op_type;
        if (is_float(x.type) && is_float(y.type)) {
            const auto bop = op == "Add" ? binary_op::add : op == "Sub" ? binary_op::sub : op == "Mul" ? binary_op::mul : binary_op::div;
            // Rank-0 operands are held as (1); broadcast by the true dims.
            auto xt = x.dims.empty() ? as(x) : as(x);
            auto yt = as(y);
            if (out.empty()) return wrap(ops::binary(ctx, bop, xt, yt), {});
            auto r = ops::binary(ctx, bop, x.dims.empty() ? xt : xt.reshape(x.dims), y.dims.empty() ? yt : yt.reshape(y.dims));
            return wrap(r.reshape(out), out);
        }
        check<value_error>(!is_float(x.type) && !is_float(y.type), exec_component(), node_label(n), ": mixes ", name_of(x.type), " and ",
                           name_of(y.type));
        const auto mx = detail::broadcast_map(x.dims, out), my = detail::broadcast_map(y.dims, out);
        std::vector<std::int64_t> r(mx.size());
        for (std::size_t k = 0; k < r.size(); ++k) {
            const auto p = x.i[static_cast<std::size_t>(mx[k])], q = y.i[static_cast<std::size_t>(my[k])];
            if (op == "Add") r[k] = p + q;
            else if (op == "Sub") r[k] = p - q;
            else if (op == "Mul") r[k] = p * q;
            else {
                check<value_error>(q != 0, exec_component(), node_label(n), ": integer division by zero");
                r[k] = p / q;
            }
        }
        if (x.type == element_type::u8)
            for (auto& v : r) v = static_cast<std::uint8_t>(v);
        return make_value(ctx, x.type, out, {}, std::move(r));
    }

    value gemm(context_t<B>& ctx, const node& n, const value& a, const value& b, const value* c) {
        check<shape_error>(a.dims.size() == 2 && b.dims.size() == 2, exec_component(), node_label(n), ": needs 2-D operands, got ",
                           detail::dims_str(a.dims), " and ", detail::dims_str(b.dims));
        const bool ta = n.attr_int("transA", 0) != 0, tb = n.attr_int("transB", 0) != 0;
        const auto k1 = ta ? a.dims[0] : a.dims[1], k2 = tb ? b.dims[1] : b.dims[0];
        check<shape_error>(k1 == k2, exec_component(), node_label(n), ": inner dimensions differ, ", detail::dims_str(a.dims), " x ",
                           detail::dims_str(b.dims));
        const double alpha = n.attr_float("alpha", 1.0f), beta = n.attr_float("beta", 1.0f);
        auto y = ops::matmul(ctx, as(a), as(b), ta, tb, alpha);
        std::vector<std::int64_t> out{ta ? a.dims[1] : a.dims[0], tb ? b.dims[0] : b.dims[1]};
        if (c && beta != 0.0) {
            check<value_error>(is_float(c->type), exec_component(), node_label(n), ": C must be float32");
            detail::broadcast(out, c->dims, node_label(n));
            auto ct = c->dims.empty() ? as(*c) : as(*c);
            if (beta != 1.0) ct = ops::scale(ctx, ct, beta);
            y = ops::add(ctx, y, ct);
            check<shape_error>(y.shape() == shape(out), exec_component(), node_label(n), ": C ", detail::dims_str(c->dims),
                               " does not broadcast to ", detail::dims_str(out));
        }
        return wrap(y, out);
    }

    value matmul(context_t<B>& ctx, const node& n, const value& a, const value& b) {
        auto ad = a.dims, bd = b.dims;
        check<shape_error>(!ad.empty() && !bd.empty(), exec_component(), node_label(n), ": scalar operand");
        const bool a1 = ad.size() == 1, b1 = bd.size() == 1;
        if (a1) ad.insert(ad.begin(), 1);
        if (b1) bd.push_back(1);
        check<shape_error>(ad.back() == bd[bd.size() - 2], exec_component(), node_label(n), ": inner dimensions differ, ",
                           detail::dims_str(a.dims), " x ", detail::dims_str(b.dims));
        ftensor at = as(a).reshape(ad), bt = as(b).reshape(bd);
        // Bring batch dims to the same rank and extent (numpy broadcasting of the leading axes).
        if (bd.size() > 2 || ad.size() > 2) {
            if (bd.size() == 2 && ad.size() > 2) {
                // shared right operand: the backend handles it directly
            } else {
                std::vector<std::int64_t> ab(ad.begin(), ad.end() - 2), bb(bd.begin(), bd.end() - 2);
                const auto batch = detail::broadcast(ab, bb, node_label(n));
                auto expand = [&](ftensor t, std::vector<std::int64_t> d, const std::vector<std::int64_t>& lead) {
                    std::vector<std::int64_t> want = lead;
                    want.push_back(d[d.size() - 2]);
                    want.push_back(d.back());
                    while (d.size() < want.size()) d.insert(d.begin(), 1);
                    t = t.reshape(d);
                    if (d == want) return t;
                    auto zeros = ftensor::zeros(ctx, shape(want));
                    return ops::add(ctx, zeros, t);
                };
                at = expand(at, ad, batch);
                bt = expand(bt, bd, batch);
            }
        }
        auto y = ops::matmul(ctx, at, bt);
        std::vector<std::int64_t> out(y.shape().begin(), y.shape().end());
        if (b1) out.pop_back();
        if (a1) out.erase(out.end() - (b1 ? 1 : 2));
        return wrap(y.reshape(out.empty() ? std::vector<index_t>{1} : out), out);
    }

    value transpose(context_t<B>& ctx, const node& n, const value& x) {
        const auto r = x.dims.size();
        auto perm = n.attr_ints("perm");
        if (perm.empty())
            for (std::size_t k = r; k-- > 0;) perm.push_back(static_cast<std::int64_t>(k));
        check<shape_error>(perm.size() == r, exec_component(), node_label(n), ": perm of ", perm.size(), " axes for rank ", r);
        std::vector<std::int64_t> dims;
        std::vector<int> p;
        std::vector<bool> seen(r, false);
        for (auto v : perm) {
            const auto a = detail::normalise_axis(v, r, node_label(n));
            check<shape_error>(!seen[static_cast<std::size_t>(a)], exec_component(), node_label(n), ": repeated axis in perm");
            seen[static_cast<std::size_t>(a)] = true;
            dims.push_back(x.dims[static_cast<std::size_t>(a)]);
            p.push_back(static_cast<int>(a));
        }
        if (r == 0) return x;
        if (is_float(x.type)) return wrap(ops::permute(ctx, as(x), p), dims);
        std::vector<std::int64_t> out(x.i.size());
        std::vector<std::int64_t> stride(r, 1);
        for (std::size_t k = r - 1; k-- > 0;) stride[k] = stride[k + 1] * x.dims[k + 1];
        std::vector<std::int64_t> idx(r, 0);
        for (std::size_t k = 0; k < out.size(); ++k) {
            std::int64_t off = 0;
            for (std::size_t d = 0; d < r; ++d) off += idx[d] * stride[static_cast<std::size_t>(p[d])];
            out[k] = x.i[static_cast<std::size_t>(off)];
            for (std::size_t d = r; d-- > 0;) {
                if (++idx[d] < dims[d]) break;
                idx[d] = 0;
            }
        }
        return make_value(ctx, x.type, dims, {}, std::move(out));
    }

    value concat(context_t<B>& ctx, const node& n, const std::vector<const value*>& a) {
        std::vector<const value*> parts;
        for (auto* p : a)
            if (p) parts.push_back(p);
        check<value_error>(!parts.empty(), exec_component(), node_label(n), ": nothing to concatenate");
        const auto& first = *parts.front();
        const auto r = first.dims.size();
        const auto axis = static_cast<std::size_t>(detail::normalise_axis(n.attr_int("axis", 0), r, node_label(n)));
        auto dims = first.dims;
        dims[axis] = 0;
        for (auto* p : parts) {
            check<shape_error>(p->dims.size() == r && p->type == first.type, exec_component(), node_label(n), ": parts differ in rank or type");
            for (std::size_t d = 0; d < r; ++d)
                check<shape_error>(d == axis || p->dims[d] == first.dims[d], exec_component(), node_label(n), ": ",
                                   detail::dims_str(p->dims), " does not fit ", detail::dims_str(first.dims));
            dims[axis] += p->dims[axis];
        }
        if (is_float(first.type)) {
            std::vector<ftensor> ts;
            for (auto* p : parts)
                if (detail::product(p->dims) > 0) ts.push_back(as(*p));
            if (ts.empty()) return make_value(ctx, first.type, dims, {});
            return wrap(ops::concat(ctx, ts, static_cast<int>(axis)), dims);
        }
        const auto outer = detail::product(dims, 0, axis), inner = detail::product(dims, axis + 1);
        std::vector<std::int64_t> out;
        out.reserve(static_cast<std::size_t>(detail::product(dims)));
        for (std::int64_t o = 0; o < outer; ++o)
            for (auto* p : parts) {
                const auto len = p->dims[axis] * inner;
                out.insert(out.end(), p->i.begin() + o * len, p->i.begin() + (o + 1) * len);
            }
        return make_value(ctx, first.type, dims, {}, std::move(out));
    }

    // Gathers `count` elements along `axis` (by the index list) from either storage.
    template <class V>
    static std::vector<V> take(const std::vector<V>& x, const std::vector<std::int64_t>& dims, std::size_t axis,
                               const std::vector<std::int64_t>& index) {
        const auto outer = detail::product(dims, 0, axis), inner = detail::product(dims, axis + 1), len = dims[axis];
        std::vector<V> out;
        out.reserve(static_cast<std::size_t>(outer * inner) * index.size());
        for (std::int64_t o = 0; o < outer; ++o)
            for (auto k : index) {
                const auto base = x.begin() + (o * len + k) * inner;
                out.insert(out.end(), base, base + inner);
            }
        return out;
    }

    value slice(context_t<B>& ctx, const node& n, const std::vector<const value*>& a) {
        check<value_error>(!a.empty() && a[0], exec_component(), node_label(n), ": input is missing");
        const auto& x = *a[0];
        const auto r = x.dims.size();
        std::vector<std::int64_t> starts, ends, axes, steps;
        if (opset_ < 10) {
            starts = n.attr_ints("starts");
            ends = n.attr_ints("ends");
            axes = n.attr_ints("axes");
        } else {
            starts = ints_of(a.size() > 1 ? a[1] : nullptr, n, "starts");
            ends = ints_of(a.size() > 2 ? a[2] : nullptr, n, "ends");
            if (a.size() > 3 && a[3]) axes = ints_of(a[3], n, "axes");
            if (a.size() > 4 && a[4]) steps = ints_of(a[4], n, "steps");
        }
        if (axes.empty())
            for (std::size_t k = 0; k < starts.size(); ++k) axes.push_back(static_cast<std::int64_t>(k));
        if (steps.empty()) steps.assign(starts.size(), 1);
        check<shape_error>(ends.size() == starts.size() && axes.size() == starts.size() && steps.size() == starts.size(),
                           exec_component(), node_label(n), ": starts, ends, axes and steps differ in length");
        // Per axis: the list of source indices.
        std::vector<std::vector<std::int64_t>> pick(r);
        for (std::size_t d = 0; d < r; ++d) {
            pick[d].resize(static_cast<std::size_t>(x.dims[d]));
            std::iota(pick[d].begin(), pick[d].end(), 0);
        }
        for (std::size_t k = 0; k < starts.size(); ++k) {
            const auto ax = static_cast<std::size_t>(detail::normalise_axis(axes[k], r, node_label(n)));
            const auto dim = x.dims[ax], step = steps[k];
            check<value_error>(step != 0, exec_component(), node_label(n), ": step 0");
            auto s = starts[k], e = ends[k];
            if (s < 0) s += dim;
            if (e < 0) e += dim;
            std::vector<std::int64_t> idx;
            if (step > 0) {
                s = std::clamp<std::int64_t>(s, 0, dim);
                e = std::clamp<std::int64_t>(e, 0, dim);
                for (auto i = s; i < e; i += step) idx.push_back(i);
            } else {
                s = std::clamp<std::int64_t>(s, -1, dim - 1);
                e = std::clamp<std::int64_t>(e, -1, dim - 1);
                for (auto i = s; i > e; i += step) idx.push_back(i);
            }
            pick[ax] = idx;
        }
        return select(ctx, x, pick);
    }

    // Cartesian selection along every axis.
    value select(context_t<B>& ctx, const value& x, const std::vector<std::vector<std::int64_t>>& pick) {
        auto dims = x.dims;
        if (is_float(x.type)) {
            auto h = host_floats(ctx, x);
            for (std::size_t d = 0; d < pick.size(); ++d) {
                if (static_cast<std::int64_t>(pick[d].size()) == dims[d]) continue;
                h = take(h, dims, d, pick[d]);
                dims[d] = static_cast<std::int64_t>(pick[d].size());
            }
            return make_value(ctx, x.type, dims, h);
        }
        auto h = x.i;
        for (std::size_t d = 0; d < pick.size(); ++d) {
            if (static_cast<std::int64_t>(pick[d].size()) == dims[d]) continue;
            h = take(h, dims, d, pick[d]);
            dims[d] = static_cast<std::int64_t>(pick[d].size());
        }
        return make_value(ctx, x.type, dims, {}, std::move(h));
    }

    value gather(context_t<B>& ctx, const node& n, const value& x, const value& idx) {
        check<value_error>(!is_float(idx.type), exec_component(), node_label(n), ": indices must be integers");
        const auto r = x.dims.size();
        check<shape_error>(r >= 1, exec_component(), node_label(n), ": data must have rank >= 1");
        const auto axis = static_cast<std::size_t>(detail::normalise_axis(n.attr_int("axis", 0), r, node_label(n)));
        std::vector<std::int64_t> index = idx.i;
        for (auto& k : index) {
            check<value_error>(k >= -x.dims[axis] && k < x.dims[axis], exec_component(), node_label(n), ": index ", k,
                               " out of range for axis of size ", x.dims[axis]);
            if (k < 0) k += x.dims[axis];
        }
        std::vector<std::int64_t> dims(x.dims.begin(), x.dims.begin() + static_cast<std::ptrdiff_t>(axis));
        dims.insert(dims.end(), idx.dims.begin(), idx.dims.end());
        dims.insert(dims.end(), x.dims.begin() + static_cast<std::ptrdiff_t>(axis) + 1, x.dims.end());
        if (is_float(x.type)) return make_value(ctx, x.type, dims, take(host_floats(ctx, x), x.dims, axis, index));
        return make_value(ctx, x.type, dims, {}, take(x.i, x.dims, axis, index));
    }

    value resize(context_t<B>& ctx, const node& n, const std::vector<const value*>& a) {
        check<value_error>(!a.empty() && a[0] && is_float(a[0]->type), exec_component(), node_label(n), ": float input is missing");
        const auto& x = *a[0];
        const auto r = x.dims.size();
        std::vector<double> scales;
        std::vector<std::int64_t> sizes;
        if (n.op_type == "Upsample") {
            if (opset_ < 9) {
                auto s = n.attr_floats("scales");
                scales.assign(s.begin(), s.end());
            } else if (a.size() > 1 && a[1]) {
                scales = host_numbers(ctx, *a[1]);
            }
        } else if (opset_ < 11) {
            if (a.size() > 1 && a[1]) scales = host_numbers(ctx, *a[1]);
        } else {
            if (a.size() > 2 && a[2] && detail::product(a[2]->dims) > 0) scales = host_numbers(ctx, *a[2]);
            if (a.size() > 3 && a[3] && detail::product(a[3]->dims) > 0) sizes = ints_of(a[3], n, "sizes");
        }
        check<shape_error>((scales.size() == r) != (sizes.size() == r), exec_component(), node_label(n),
                           ": needs exactly one of scales and sizes, one value per axis (", r, ")");
        std::vector<std::int64_t> out(r);
        for (std::size_t d = 0; d < r; ++d) {
            if (sizes.empty()) {
                check<value_error>(scales[d] > 0 && std::isfinite(scales[d]), exec_component(), node_label(n), ": bad scale ", scales[d]);
                out[d] = static_cast<std::int64_t>(std::floor(static_cast<double>(x.dims[d]) * scales[d]));
            } else {
                out[d] = sizes[d];
                scales.push_back(static_cast<double>(sizes[d]) / static_cast<double>(x.dims[d]));
            }
            check<value_error>(out[d] > 0 && out[d] <= (1 << 20), exec_component(), node_label(n), ": output size ", out[d]);
        }
        const auto ct = n.op_type == "Upsample" ? std::string("asymmetric") : n.attr_string("coordinate_transformation_mode", "half_pixel");
        const auto nm = n.op_type == "Upsample" ? std::string("floor") : n.attr_string("nearest_mode", "round_prefer_floor");
        // An integer factor on H and W only is the backend's nearest upsampling.
        if (r == 4 && scales[0] == 1 && scales[1] == 1 && scales[2] == scales[3] && scales[2] >= 1 && scales[2] == std::floor(scales[2]) &&
            out[2] == x.dims[2] * static_cast<std::int64_t>(scales[2]) && out[3] == x.dims[3] * static_cast<std::int64_t>(scales[3]) &&
            (ct == "asymmetric" || ct == "half_pixel" || ct == "pytorch_half_pixel") && (nm == "floor" || nm == "round_prefer_floor"))
            return wrap(ops::upsample_nearest(ctx, as(x), static_cast<index_t>(scales[2])), out);
        std::vector<std::vector<std::int64_t>> pick(r);
        for (std::size_t d = 0; d < r; ++d) {
            const double s = scales[d];
            const auto len = x.dims[d];
            for (std::int64_t i = 0; i < out[d]; ++i) {
                double c;
                if (ct == "asymmetric") c = i / s;
                else if (ct == "align_corners") c = out[d] == 1 ? 0.0 : i * static_cast<double>(len - 1) / static_cast<double>(out[d] - 1);
                else if (ct == "pytorch_half_pixel") c = out[d] > 1 ? (i + 0.5) / s - 0.5 : 0.0;
                else if (ct == "tf_half_pixel_for_nn") c = (i + 0.5) / s;
                else c = (i + 0.5) / s - 0.5;
                double k;
                if (nm == "floor") k = std::floor(c);
                else if (nm == "ceil") k = std::ceil(c);
                else if (nm == "round_prefer_ceil") k = std::floor(c + 0.5);
                else k = (c - std::floor(c) == 0.5) ? std::floor(c) : std::round(c);
                pick[d].push_back(std::clamp<std::int64_t>(static_cast<std::int64_t>(k), 0, len - 1));
            }
        }
        return select_full(ctx, x, pick);
    }

    // Like select, but applied on every axis (lists may repeat indices).
    value select_full(context_t<B>& ctx, const value& x, const std::vector<std::vector<std::int64_t>>& pick) {
        auto dims = x.dims;
        auto h = host_floats(ctx, x);
        for (std::size_t d = 0; d < pick.size(); ++d) {
            h = take(h, dims, d, pick[d]);
            dims[d] = static_cast<std::int64_t>(pick[d].size());
        }
        return make_value(ctx, x.type, dims, h);
    }

    value pool(context_t<B>& ctx, const node& n, const value& x) {
        check<shape_error>(x.dims.size() == 4, exec_component(), node_label(n), ": needs NCHW input, got ", detail::dims_str(x.dims));
        const auto k = n.attr_ints("kernel_shape");
        check<shape_error>(k.size() == 2 && k[0] > 0 && k[1] > 0, exec_component(), node_label(n), ": needs a 2-D kernel_shape");
        const auto strides = n.attr_ints("strides", {1, 1});
        const auto dil = n.attr_ints("dilations", {1, 1});
        check<shape_error>(strides.size() == 2 && dil.size() == 2 && strides[0] > 0 && strides[1] > 0, exec_component(), node_label(n),
                           ": bad strides or dilations");
        const bool is_max = n.op_type == "MaxPool";
        const bool ceil_mode = n.attr_int("ceil_mode", 0) != 0;
        const bool include_pad = n.attr_int("count_include_pad", 0) != 0;
        const auto p = spatial_pads(n, x.dims, k, strides, dil);
        std::int64_t out_hw[2];
        for (int a = 0; a < 2; ++a) {
            const auto in = x.dims[static_cast<std::size_t>(2 + a)] + p[static_cast<std::size_t>(a)] + p[static_cast<std::size_t>(a + 2)];
            const auto eff = (k[static_cast<std::size_t>(a)] - 1) * dil[static_cast<std::size_t>(a)] + 1;
            const auto st = strides[static_cast<std::size_t>(a)];
            check<shape_error>(in >= eff, exec_component(), node_label(n), ": kernel larger than the padded input");
            auto o = ceil_mode ? (in - eff + st - 1) / st + 1 : (in - eff) / st + 1;
            // The last window must start inside the input or its left padding.
            if (ceil_mode && (o - 1) * st >= x.dims[static_cast<std::size_t>(2 + a)] + p[static_cast<std::size_t>(a)]) --o;
            out_hw[a] = o;
        }
        const auto H = x.dims[2], W = x.dims[3], OH = out_hw[0], OW = out_hw[1];
        const auto h = host_floats(ctx, x);
        std::vector<float> y(static_cast<std::size_t>(x.dims[0] * x.dims[1] * OH * OW));
        for (std::int64_t nc = 0; nc < x.dims[0] * x.dims[1]; ++nc)
            for (std::int64_t oy = 0; oy < OH; ++oy)
                for (std::int64_t ox = 0; ox < OW; ++ox) {
                    double acc = is_max ? -INFINITY : 0.0;
                    std::int64_t count = 0, padded_count = 0;
                    for (std::int64_t ky = 0; ky < k[0]; ++ky)
                        for (std::int64_t kx = 0; kx < k[1]; ++kx) {
                            const auto iy = oy * strides[0] + ky * dil[0] - p[0], ix = ox * strides[1] + kx * dil[1] - p[1];
                            // count_include_pad counts the explicit padding, not the ceil_mode overhang.
                            if (iy < H + p[2] && ix < W + p[3]) ++padded_count;
                            if (iy < 0 || ix < 0 || iy >= H || ix >= W) continue;
                            const float v = h[static_cast<std::size_t>((nc * H + iy) * W + ix)];
                            if (is_max) acc = std::max<double>(acc, v);
                            else acc += v;
                            ++count;
                        }
                    if (!is_max) acc /= static_cast<double>(include_pad ? padded_count : std::max<std::int64_t>(count, 1));
                    y[static_cast<std::size_t>((nc * OH + oy) * OW + ox)] = static_cast<float>(acc);
                }
        return make_value(ctx, element_type::f32, {x.dims[0], x.dims[1], OH, OW}, y);
    }

    value softmax(context_t<B>& ctx, const node& n, const value& x) {
        const auto r = x.dims.size();
        check<shape_error>(r >= 1, exec_component(), node_label(n), ": needs rank >= 1");
        const auto axis = static_cast<std::size_t>(detail::normalise_axis(n.attr_int("axis", opset_ >= 13 ? -1 : 1), r, node_label(n)));
        if (opset_ < 13) {  // softmax over the flattened trailing axes
            const auto rows = detail::product(x.dims, 0, axis), cols = detail::product(x.dims, axis);
            return wrap(ops::softmax(ctx, as(x).reshape({rows, cols})).reshape(x.dims), x.dims);
        }
        if (axis == r - 1) return wrap(ops::softmax(ctx, as(x)), x.dims);
        std::vector<int> perm;
        for (std::size_t d = 0; d < r; ++d)
            if (d != axis) perm.push_back(static_cast<int>(d));
        perm.push_back(static_cast<int>(axis));
        std::vector<int> inverse(r);
        for (std::size_t d = 0; d < r; ++d) inverse[static_cast<std::size_t>(perm[d])] = static_cast<int>(d);
        auto y = ops::softmax(ctx, ops::permute(ctx, as(x), perm));
        return wrap(ops::permute(ctx, y, inverse), x.dims);
    }

    value cast(context_t<B>& ctx, const node& n, const value& x) {
        const auto to = n.attr_int("to", 1);
        const element_type t = to == 1 ? element_type::f32 : to == 7 ? element_type::i64 : to == 6 ? element_type::i32
                               : to == 2 ? element_type::u8 : to == 3 ? element_type::i8 : element_type::boolean;
        if (is_float(t)) {
            if (is_float(x.type)) return x;
            std::vector<float> f(x.i.begin(), x.i.end());
            return make_value(ctx, t, x.dims, f);
        }
        std::vector<std::int64_t> v;
        if (is_float(x.type)) {
            for (float f : host_floats(ctx, x)) {
                check<value_error>(std::isfinite(f), exec_component(), node_label(n), ": cannot cast NaN or infinity to an integer");
                v.push_back(t == element_type::boolean ? (f != 0.0f) : static_cast<std::int64_t>(std::trunc(f)));
            }
        } else {
            v = x.i;
        }
        for (auto& e : v) {
            if (t == element_type::i32) e = static_cast<std::int32_t>(e);
            else if (t == element_type::u8) e = static_cast<std::uint8_t>(e);
            else if (t == element_type::i8) e = static_cast<std::int8_t>(e);
            else if (t == element_type::boolean) e = e != 0;
        }
        return make_value(ctx, t, x.dims, {}, std::move(v));
    }

    value constant(context_t<B>& ctx, const node& n) {
        if (const auto* a = n.find("value"); a && a->type == attribute::kind::t) return from_host(ctx, a->t);
        if (const auto* a = n.find("value_float")) return make_value(ctx, element_type::f32, {}, {a->f});
        if (const auto* a = n.find("value_floats"))
            return make_value(ctx, element_type::f32, {static_cast<std::int64_t>(a->floats.size())}, a->floats);
        if (const auto* a = n.find("value_int")) return make_value(ctx, element_type::i64, {}, {}, {a->i});
        if (const auto* a = n.find("value_ints"))
            return make_value(ctx, element_type::i64, {static_cast<std::int64_t>(a->ints.size())}, {}, a->ints);
        throw unsupported_error(exec_component(), node_label(n) + ": constant without a supported value");
    }

    std::int64_t opset_;
    std::vector<value_info> inputs_, outputs_;
    std::vector<node> nodes_;
    std::unordered_map<std::string, const host_tensor*> host_init_;
    std::vector<host_tensor> folded_;
    std::unordered_map<std::string, value> constants_;
    std::unordered_map<std::string, int> uses_;
};

}  // namespace dynamicid::face::onnx
