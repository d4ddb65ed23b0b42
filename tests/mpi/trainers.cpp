// Both DynamicID trainers under mpirun: N ranks, each running 1/N of every
// step's batch, with gradients summed through the overlapped all-reduce while
// the backward runs, must end with the parameters of one process that runs
// the whole batch (computed by every rank in the same program with the
// single-process communicator). Tiny random SD and DynamicID models.
//
//     mpirun -np 2 dynamicid_mpi_trainers

// stb_image's implementation for this program (the library's loader header only declares it).
#include <support/stb_image_impl.hpp>

#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/training/anchor_trainer.hpp>
#include <dynamicid/training/imr_trainer.hpp>
#include <dynamicid/training/mpi_communicator.hpp>

#include <support/trainer_fixture.hpp>

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

namespace {

using namespace dynamicid_test::trainers;
using B = dynamicid::cpu_backend;
using tensor_f = dynamicid::tensor<B, float>;

// Largest |a - b| / (atol + |b|) over every parameter element.
double worst(B::context& ctx, const std::vector<tensor_f>& a, const std::vector<tensor_f>& b, double atol) {
    if (a.size() != b.size()) return 1e30;
    double w = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        const auto x = a[i].to_host(ctx), y = b[i].to_host(ctx);
        if (x.size() != y.size()) return 1e30;
        for (std::size_t k = 0; k < x.size(); ++k) w = std::max(w, std::fabs(double(x[k]) - y[k]) / (atol + std::fabs(double(y[k]))));
    }
    return w;
}

template <class Distributed, class Single, class Config>
int compare(B::context& ctx, training::mpi_communicator& comm, const char* name, Config cfg, const fs::path& dir, double tolerance) {
    auto one = cfg;
    one.output_dir = dir / (std::string(name) + "_single");
    Single single(ctx, one);
    std::vector<double> norms_one, norms_many, loss_one, loss_many;
    single.run(ctx, {}, [&](const training::train_progress& p) { norms_one.push_back(p.grad_norm), loss_one.push_back(p.loss); });
    auto many = cfg;
    many.output_dir = dir / (std::string(name) + "_ranks");
    many.bucket_mb = 0.001;  // several buckets, so reductions start while the backward runs
    Distributed distributed(ctx, many, &comm);
    distributed.run(ctx, {}, [&](const training::train_progress& p) { norms_many.push_back(p.grad_norm), loss_many.push_back(p.loss); });
    const double w = worst(ctx, distributed.parameters(), single.parameters(), 1e-4);
    // AdamW hardly sees a uniformly scaled gradient; the norms before clipping and the losses do.
    double dn = norms_one.size() == norms_many.size() ? 0 : 1e30, dl = dn;
    for (std::size_t i = 0; i < norms_one.size() && i < norms_many.size(); ++i) {
        dn = std::max(dn, std::fabs(norms_many[i] - norms_one[i]) / norms_one[i]);
        dl = std::max(dl, std::fabs(loss_many[i] - loss_one[i]) / loss_one[i]);
    }
    const bool ok = w <= tolerance && dn <= 1e-4 && dl <= 1e-5;
    std::printf("rank %d/%d %s: %lld steps, worst relative difference: parameters %.3g (tolerance %.1g), gradient norms %.3g, losses %.3g %s\n",
                comm.rank(), comm.size(), name, static_cast<long long>(cfg.steps), w, tolerance, dn, dl, ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    training::mpi_environment mpi(argc, argv);
    int failures = 0;
    try {
        training::mpi_communicator comm;
        B::context ctx{.threads = 1};
        temp_dir dir("mpi_rank" + std::to_string(comm.rank()));
        const auto manifest = write_dataset(dir.path);
        auto anchor = anchor_config(manifest, dir.path, 3);
        anchor.batch = 4;
        failures += compare<training::anchor_trainer<B, float, training::mpi_communicator>, training::anchor_trainer<B>>(
            ctx, comm, "anchor", anchor, dir.path, 1e-3);
        auto imr = imr_config(manifest, dir.path, 3);
        imr.batch = 4;
        failures += compare<training::imr_trainer<B, float, training::mpi_communicator>, training::imr_trainer<B>>(ctx, comm, "imr", imr,
                                                                                                                  dir.path, 1e-3);
        MPI_Allreduce(MPI_IN_PLACE, &failures, 1, MPI_INT, MPI_SUM, comm.native());
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    return failures == 0 ? 0 : 1;
}
