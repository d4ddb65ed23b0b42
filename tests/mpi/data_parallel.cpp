// Data-parallel training under mpirun: a small MLP (linear -> GELU -> linear,
// mean squared error) trained for a few AdamW steps with clipping and an LR
// schedule. Each of the N ranks sees 1/N of the batch, its gradients are
// averaged through the gradient_bucketer while the backward runs, and every
// rank must end with the parameters that one process computes from the whole
// batch (run in the same program with the single-process communicator).
//
//     mpirun -np 4 dynamicid_mpi_data_parallel
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/ops.hpp>
#include <dynamicid/training/communicator.hpp>
#include <dynamicid/training/lr_schedule.hpp>
#include <dynamicid/training/mpi_communicator.hpp>
#include <dynamicid/training/optim.hpp>

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

namespace {

namespace training = dynamicid::training;
namespace ops = dynamicid::ops;
using B = dynamicid::cpu_backend;
using dynamicid::index_t;

constexpr index_t batch = 8, in = 8, hidden = 16, out = 4;
constexpr int steps = 5;

template <class T>
using tensor = dynamicid::tensor<B, T>;

template <class T>
struct mlp {
    std::vector<tensor<T>> params;  // w1, b1, w2, b2: the order gradients are indexed by
};

template <class T>
mlp<T> make_model(B::context& ctx, std::uint64_t seed) {
    mlp<T> m;
    const auto scaled = [&](dynamicid::shape s, std::uint64_t k, double factor) {
        return ops::scale(ctx, ops::randn<B, T>(ctx, s, seed + k), factor);
    };
    m.params = {scaled({hidden, in}, 0, 0.3), scaled({hidden}, 1, 0.1), scaled({out, hidden}, 2, 0.3), scaled({out}, 3, 0.1)};
    return m;
}

// One iteration's forward and backward on `x` (rows, in) against `target`; the
// backward reports each parameter's gradient as soon as it is final, last layer first.
template <class T, class Ready>
void forward_backward(B::context& ctx, const mlp<T>& m, const tensor<T>& x, const tensor<T>& target, std::vector<tensor<T>>& grads,
                      Ready&& ready) {
    const auto& p = m.params;
    auto [h, s1] = ops::linear_forward(ctx, x, p[0], &p[1], ops::needs{.input = false, .params = true});
    auto [a, sa] = ops::unary_forward(ctx, dynamicid::unary_op::gelu_erf, h);
    auto [y, s2] = ops::linear_forward(ctx, a, p[2], &p[3]);
    // loss = sum((y - target)^2) / (2 rows): the gradient is (y - target) / rows.
    const auto dy = ops::scale(ctx, ops::sub(ctx, y, target), 1.0 / static_cast<double>(x.dim(0)));
    auto g2 = ops::linear_backward(ctx, s2, dy);
    grads[3] = g2.bias;
    ready(3, grads[3]);
    grads[2] = g2.weight;
    ready(2, grads[2]);
    auto g1 = ops::linear_backward(ctx, s1, ops::unary_backward(ctx, sa, g2.input));
    grads[1] = g1.bias;
    ready(1, grads[1]);
    grads[0] = g1.weight;
    ready(0, grads[0]);
}

template <class T, class C>
mlp<T> train(B::context& ctx, C& comm, bool check_overlap, int& failures) {
    const int rank = comm.rank(), size = comm.size();
    // Non-root ranks start from other weights: the broadcast must fix that.
    auto model = make_model<T>(ctx, rank == 0 ? 11 : 11 + 100 * static_cast<std::uint64_t>(rank));
    for (auto& p : model.params) training::broadcast(ctx, comm, p, 0);

    const auto x_all = ops::randn<B, T>(ctx, {batch, in}, 1234);
    const auto t_all = ops::randn<B, T>(ctx, {batch, out}, 5678);
    const index_t rows = batch / size;
    const auto x = x_all.narrow_leading(rank * rows, rows);
    const auto t = t_all.narrow_leading(rank * rows, rows);

    training::adamw<B, T> opt(ctx, {{.params = {model.params[0], model.params[2]}, .options = {.lr = 5e-2, .weight_decay = 0.1}},
                                    {.params = {model.params[1], model.params[3]}, .options = {.lr = 5e-2, .weight_decay = 0.0}}});
    const training::lr_schedule schedule{.kind = training::lr_schedule_kind::linear, .base_lr = 5e-2, .warmup_steps = 2,
                                         .total_steps = 8};
    // 256-byte buckets: {b2, w2} and {b1, w1} in f64, so the first one starts mid-backward.
    training::gradient_bucketer<B, T, C> buckets(comm, model.params, {.bucket_bytes = 256});
    std::vector<tensor<T>> grads(4);
    for (int step = 0; step < steps; ++step) {
        forward_backward(ctx, model, x, t, grads, [&](std::size_t i, tensor<T>& g) {
            buckets.grad_ready(ctx, i, g);
            if (check_overlap && i == 2 && buckets.buckets_started() != 1) {
                std::fprintf(stderr, "rank %d: the first bucket did not start before the backward finished\n", rank);
                ++failures;
            }
        });
        buckets.finish(ctx);
        training::clip_grad_norm(ctx, grads, 0.5);
        opt.set_lr(schedule.lr(step));
        // The optimizer's flat order is group by group: w1, w2, b1, b2.
        opt.step(ctx, std::vector{grads[0], grads[2], grads[1], grads[3]});
    }
    return model;
}

template <class T>
double max_rel_diff(B::context& ctx, const mlp<T>& a, const mlp<T>& b) {
    double worst = 0.0;
    for (std::size_t i = 0; i < a.params.size(); ++i) {
        const auto x = a.params[i].to_host(ctx), y = b.params[i].to_host(ctx);
        for (std::size_t e = 0; e < x.size(); ++e)
            worst = std::max(worst, std::abs(double(x[e]) - double(y[e])) / std::max(std::abs(double(y[e])), 1e-3));
    }
    return worst;
}

template <class T>
int run(B::context& ctx, training::mpi_communicator& comm, const char* type, double tolerance) {
    int failures = 0;
    training::single_process_communicator alone;
    const auto reference = train<T>(ctx, alone, false, failures);
    const auto parallel = train<T>(ctx, comm, comm.size() > 1, failures);
    const double diff = max_rel_diff(ctx, parallel, reference);
    if (!(diff <= tolerance)) {
        std::fprintf(stderr, "rank %d (%s): parameters differ from the one-process run by %.3g (tolerance %.3g)\n", comm.rank(),
                     type, diff, tolerance);
        ++failures;
    }
    // Every rank holds the same parameters, bit for bit (they reduced the same sums).
    double spread = 0.0;
    for (const auto& p : parallel.params) {
        auto mine = p.to_host(ctx);
        auto root = mine;
        comm.broadcast(std::span<T>(root), 0);
        for (std::size_t e = 0; e < mine.size(); ++e) spread = std::max(spread, std::abs(double(mine[e]) - double(root[e])));
    }
    if (spread != 0.0) {
        std::fprintf(stderr, "rank %d (%s): parameters differ from rank 0's by %.3g\n", comm.rank(), type, spread);
        ++failures;
    }
    if (comm.rank() == 0)
        std::printf("%s, %d ranks: max relative difference to one process %.3g (tolerance %.3g)\n", type, comm.size(), diff,
                    tolerance);
    return failures;
}

}  // namespace

int main(int argc, char** argv) {
    training::mpi_environment mpi(argc, argv);
    int failures = 0;
    try {
        training::mpi_communicator comm;
        if (batch % comm.size() != 0) {
            if (comm.rank() == 0) std::fprintf(stderr, "run with a number of ranks that divides %lld\n", (long long)batch);
            return 1;
        }
        B::context ctx{.threads = 1};
        failures += run<double>(ctx, comm, "f64", 1e-12);
        failures += run<float>(ctx, comm, "f32", 1e-5);
        MPI_Allreduce(MPI_IN_PLACE, &failures, 1, MPI_INT, MPI_SUM, comm.native());
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    return failures == 0 ? 0 : 1;
}
