// Training: AdamW, gradient clipping, LR schedules and the loss scaler against
// torch / diffusers goldens (tools/golden/make_optim_goldens.py), optimizer
// state round trips, and the gradient bucketer with an in-process communicator.
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/training/communicator.hpp>
#include <dynamicid/training/loss_scaler.hpp>
#include <dynamicid/training/lr_schedule.hpp>
#include <dynamicid/training/optim.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace training = dynamicid::training;
namespace io = dynamicid::io;
using dynamicid::cpu_backend;
using dynamicid::index_t;
using dynamicid::shape;
template <class T>
using tensor = dynamicid::tensor<cpu_backend, T>;

const fs::path golden_dir = fs::path(DYNAMICID_TEST_DATA_DIR) / "golden" / "optim";

nlohmann::json config_of(const io::safetensors_file& f) { return nlohmann::json::parse(f.metadata().at("config")); }

// Row k of a stacked (steps, ...) golden tensor.
std::vector<float> row(const io::safetensors_file& f, const std::string& name, std::size_t k) {
    const auto all = f.to_vector<float>(name);
    const auto& dims = f.info(name).dims;
    const auto n = static_cast<std::size_t>(dims.numel() / dims[0]);
    return {all.begin() + static_cast<std::ptrdiff_t>(k * n), all.begin() + static_cast<std::ptrdiff_t>((k + 1) * n)};
}

shape row_shape(const io::safetensors_file& f, const std::string& name) {
    auto d = f.info(name).dims.to_vector();
    d.erase(d.begin());
    return shape(d);
}

// Largest |a - b| / max(|b|, floor) over the elements.
double max_rel(const std::vector<float>& a, const std::vector<float>& b, double floor = 1e-3) {
    REQUIRE(a.size() == b.size());
    double worst = 0.0;
    for (std::size_t i = 0; i < a.size(); ++i)
        worst = std::max(worst, std::abs(double(a[i]) - double(b[i])) / std::max(std::abs(double(b[i])), floor));
    return worst;
}

// Largest |a - b| relative to the largest |b|: for sums that may cancel to ~0.
double max_scaled(const std::vector<float>& a, const std::vector<float>& b) {
    REQUIRE(a.size() == b.size());
    double worst = 0.0, scale = 0.0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        worst = std::max(worst, std::abs(double(a[i]) - double(b[i])));
        scale = std::max(scale, std::abs(double(b[i])));
    }
    return worst / scale;
}

bool bit_equal(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// The optimizer a golden file describes, over copies of its initial parameters in T.
template <class T>
struct golden_optimizer {
    std::vector<tensor<T>> params;
    std::vector<training::param_group<cpu_backend, T>> groups;

    golden_optimizer(cpu_backend::context& ctx, const io::safetensors_file& f) {
        const auto cfg = config_of(f);
        std::size_t i = 0;
        for (const auto& g : cfg.at("groups")) {
            training::param_group<cpu_backend, T> group;
            group.options = {.lr = g.at("lr").get<double>(), .beta1 = cfg.at("betas")[0].get<double>(),
                             .beta2 = cfg.at("betas")[1].get<double>(), .eps = cfg.at("eps").get<double>(),
                             .weight_decay = g.at("weight_decay").get<double>(), .amsgrad = cfg.at("amsgrad").get<bool>()};
            for (std::size_t j = 0; j < g.at("shapes").size(); ++j, ++i) {
                const auto name = "input.param." + std::to_string(i);
                params.push_back(f.load<cpu_backend, T>(ctx, name));
                group.params.push_back(params.back());
            }
            groups.push_back(group);
        }
    }
};

template <class T>
std::vector<tensor<T>> golden_grads(cpu_backend::context& ctx, const io::safetensors_file& f, std::size_t count, std::size_t k) {
    std::vector<tensor<T>> grads;
    for (std::size_t i = 0; i < count; ++i) {
        const auto name = "input.grad." + std::to_string(i);
        const auto values = row(f, name, k);
        std::vector<T> converted(values.size());
        for (std::size_t e = 0; e < values.size(); ++e) converted[e] = T(values[e]);
        grads.push_back(tensor<T>::from_host(ctx, row_shape(f, name), converted));
    }
    return grads;
}

std::vector<fs::path> adamw_cases() {
    std::vector<fs::path> out;
    for (const auto& e : fs::directory_iterator(golden_dir))
        if (e.path().filename().string().rfind("adamw_", 0) == 0) out.push_back(e.path());
    std::sort(out.begin(), out.end());
    return out;
}

}  // namespace

TEST_CASE("AdamW matches torch.optim.AdamW step by step, with groups and clipping", "[training][optim]") {
    cpu_backend::context ctx;
    const auto cases = adamw_cases();
    REQUIRE(cases.size() >= 4);
    for (const auto& path : cases) {
        const auto f = io::safetensors_file::open(path);
        const auto cfg = config_of(f);
        const auto steps = cfg.at("steps").get<std::size_t>();
        const bool clip = cfg.contains("max_norm");
        golden_optimizer<float> g(ctx, f);
        training::adamw<cpu_backend, float> opt(ctx, g.groups);
        double worst_param = 0.0, worst_norm = 0.0;
        for (std::size_t k = 0; k < steps; ++k) {
            auto grads = golden_grads<float>(ctx, f, g.params.size(), k);
            if (clip) {
                const double norm = training::clip_grad_norm(ctx, grads, cfg.at("max_norm").get<double>());
                const double want = f.to_vector<float>("output.total_norm")[k];
                worst_norm = std::max(worst_norm, std::abs(norm - want) / want);
            }
            opt.step(ctx, grads);
            for (std::size_t i = 0; i < g.params.size(); ++i)
                worst_param = std::max(worst_param, max_rel(g.params[i].to_host(ctx), row(f, "output.param." + std::to_string(i), k)));
        }
        INFO(path.filename().string() << " worst param rel " << worst_param << " worst norm rel " << worst_norm);
        CHECK(worst_param < 1e-6);
        CHECK(worst_norm < 1e-6);
        const auto state = opt.state_dict(ctx);
        for (std::size_t i = 0; i < g.params.size(); ++i) {
            const auto p = "state." + std::to_string(i) + ".";
            const auto o = std::to_string(i);
            CHECK(opt.step_count(i) == static_cast<std::int64_t>(steps));
            CHECK(state.at(p + "step").to_host(ctx)[0] == float(steps));
            // exp_avg is a running sum whose elements may cancel to ~0: compare against the tensor's scale.
            CHECK(max_scaled(state.at(p + "exp_avg").to_host(ctx), f.to_vector<float>("output.exp_avg." + o)) < 1e-6);
            CHECK(max_rel(state.at(p + "exp_avg_sq").to_host(ctx), f.to_vector<float>("output.exp_avg_sq." + o)) < 1e-6);
            if (cfg.at("amsgrad").get<bool>())
                CHECK(max_rel(state.at(p + "max_exp_avg_sq").to_host(ctx), f.to_vector<float>("output.max_exp_avg_sq." + o)) < 1e-6);
        }
    }
}

TEMPLATE_TEST_CASE("AdamW keeps f32 master weights for 16-bit parameters", "[training][optim]", dynamicid::half,
                   dynamicid::bfloat16) {
    // Fed the same (16-bit rounded) values, the master copy follows the f32 optimizer bit for bit.
    cpu_backend::context ctx;
    const auto f = io::safetensors_file::open(golden_dir / "adamw_two_groups.safetensors");
    golden_optimizer<TestType> low(ctx, f);
    golden_optimizer<float> full(ctx, f);
    for (std::size_t i = 0; i < full.params.size(); ++i) {
        const auto rounded = low.params[i].to_host(ctx);
        std::vector<float> widened(rounded.size());
        for (std::size_t e = 0; e < rounded.size(); ++e) widened[e] = float(rounded[e]);
        cpu_backend::copy_from_host(ctx, widened.data(), full.params[i].data(), widened.size());
    }
    training::adamw<cpu_backend, TestType> opt_low(ctx, low.groups);
    training::adamw<cpu_backend, float> opt_full(ctx, full.groups);
    STATIC_REQUIRE(training::adamw<cpu_backend, TestType>::keeps_master_weights);
    for (std::size_t k = 0; k < 10; ++k) {
        const auto g_low = golden_grads<TestType>(ctx, f, low.params.size(), k);
        std::vector<tensor<float>> g_full;
        for (const auto& g : g_low) {
            const auto h = g.to_host(ctx);
            std::vector<float> w(h.size());
            for (std::size_t e = 0; e < h.size(); ++e) w[e] = float(h[e]);
            g_full.push_back(tensor<float>::from_host(ctx, g.shape(), w));
        }
        opt_low.step(ctx, g_low);
        opt_full.step(ctx, g_full);
    }
    const auto state = opt_low.state_dict(ctx);
    for (std::size_t i = 0; i < full.params.size(); ++i) {
        const auto master = state.at("state." + std::to_string(i) + ".master").to_host(ctx);
        CHECK(bit_equal(master, full.params[i].to_host(ctx)));
        const auto stored = low.params[i].to_host(ctx);
        for (std::size_t e = 0; e < stored.size(); ++e) CHECK(stored[e] == TestType(master[e]));
    }
}

TEST_CASE("AdamW state survives a safetensors round trip bit for bit", "[training][optim]") {
    cpu_backend::context ctx;
    const auto f = io::safetensors_file::open(golden_dir / "adamw_amsgrad.safetensors");
    golden_optimizer<float> a(ctx, f);
    training::adamw<cpu_backend, float> straight(ctx, a.groups);
    for (std::size_t k = 0; k < 4; ++k) straight.step(ctx, golden_grads<float>(ctx, f, a.params.size(), k));

    // Checkpoint: parameters and optimizer state into one file.
    const auto file = fs::temp_directory_path() / "dynamicid_optim_state_roundtrip.safetensors";
    io::safetensors_writer w;
    for (std::size_t i = 0; i < a.params.size(); ++i) w.add(ctx, "param." + std::to_string(i), a.params[i]);
    for (const auto& [name, t] : straight.state_dict(ctx)) w.add(ctx, "optimizer." + name, t);
    w.write(file);

    const auto saved = io::safetensors_file::open(file);
    golden_optimizer<float> b(ctx, f);
    for (std::size_t i = 0; i < b.params.size(); ++i) {
        const auto values = saved.to_vector<float>("param." + std::to_string(i));
        cpu_backend::copy_from_host(ctx, values.data(), b.params[i].data(), values.size());
    }
    training::adamw<cpu_backend, float> resumed(ctx, b.groups);
    training::adamw<cpu_backend, float>::state_map state;
    for (const auto& name : saved.names())
        if (name.rfind("optimizer.", 0) == 0) state.emplace(name.substr(10), saved.load<cpu_backend, float>(ctx, name));
    resumed.load_state_dict(ctx, state);
    fs::remove(file);

    for (std::size_t k = 4; k < 10; ++k) {
        straight.step(ctx, golden_grads<float>(ctx, f, a.params.size(), k));
        resumed.step(ctx, golden_grads<float>(ctx, f, b.params.size(), k));
    }
    for (std::size_t i = 0; i < a.params.size(); ++i) CHECK(bit_equal(a.params[i].to_host(ctx), b.params[i].to_host(ctx)));
    CHECK(resumed.step_count(0) == 10);
}

TEST_CASE("AdamW rejects bad state, gradients and options", "[training][optim]") {
    cpu_backend::context ctx;
    auto p = tensor<float>::full(ctx, {2, 3}, 1.0f);
    training::adamw<cpu_backend, float> opt(ctx, {p});
    opt.step(ctx, std::vector{tensor<float>::full(ctx, {2, 3}, 0.5f)});
    const auto good = opt.state_dict(ctx);
    REQUIRE(good.size() == 3);

    auto unknown = good;
    unknown.emplace("state.7.exp_avg", tensor<float>::zeros(ctx, {2, 3}));
    CHECK_THROWS_WITH(opt.load_state_dict(ctx, unknown), Catch::Contains("[adamw] unknown state entry 'state.7.exp_avg'"));
    auto wrong_shape = good;
    wrong_shape.insert_or_assign("state.0.exp_avg", tensor<float>::zeros(ctx, {3, 2}));
    CHECK_THROWS_AS(opt.load_state_dict(ctx, wrong_shape), dynamicid::shape_error);
    auto partial = good;
    partial.erase("state.0.exp_avg_sq");
    CHECK_THROWS_WITH(opt.load_state_dict(ctx, partial), Catch::Contains("incomplete"));
    auto bad_step = good;
    bad_step.insert_or_assign("state.0.step", tensor<float>::full(ctx, {1}, 2.5f));
    CHECK_THROWS_WITH(opt.load_state_dict(ctx, bad_step), Catch::Contains("positive integer"));
    CHECK(opt.step_count(0) == 1);  // failed loads change nothing

    CHECK_THROWS_AS(opt.step(ctx, std::vector{tensor<float>::zeros(ctx, {3, 2})}), dynamicid::shape_error);
    CHECK_THROWS_AS(opt.step(ctx, std::vector<tensor<float>>{}), dynamicid::shape_error);
    opt.step(ctx, std::vector{tensor<float>{}});  // no gradient: skipped, as torch skips p.grad None
    CHECK(opt.step_count(0) == 1);
    CHECK_THROWS_WITH((training::adamw<cpu_backend, float>(ctx, {p}, {.beta1 = 1.0})), Catch::Contains("[adamw] group 0: beta1"));
    CHECK_THROWS_AS(opt.set_lr(std::numeric_limits<double>::quiet_NaN()), dynamicid::value_error);
}

TEST_CASE("clip_grad_norm reports non-finite norms", "[training][optim]") {
    cpu_backend::context ctx;
    std::vector<tensor<float>> grads{tensor<float>::full(ctx, {4}, 3.0f), tensor<float>::full(ctx, {2}, 1.0f)};
    // Norm sqrt(4*9 + 2) = sqrt(38); below max_norm nothing changes.
    CHECK(training::clip_grad_norm(ctx, grads, 100.0) == Approx(std::sqrt(38.0)).epsilon(1e-7));
    CHECK(grads[0].to_host(ctx)[0] == 3.0f);
    const double n = training::clip_grad_norm(ctx, grads, 1.0);
    CHECK(n == Approx(std::sqrt(38.0)).epsilon(1e-7));
    CHECK(training::clip_grad_norm(ctx, grads, 100.0) == Approx(1.0).epsilon(1e-6));

    const std::vector<float> bad{1.0f, std::numeric_limits<float>::infinity()};
    std::vector<tensor<float>> inf{tensor<float>::from_host(ctx, {2}, bad)};
    CHECK(std::isinf(training::clip_grad_norm(ctx, inf, 1.0)));
    CHECK(inf[0].to_host(ctx)[0] == 1.0f);  // left as they were
    CHECK_THROWS_WITH(training::clip_grad_norm(ctx, inf, 1.0, {.error_if_nonfinite = true}),
                      Catch::Contains("[clip_grad_norm] the total norm of the gradients is inf"));
    CHECK_THROWS_AS(training::clip_grad_norm(ctx, grads, -1.0), dynamicid::value_error);
}

TEST_CASE("LR schedules match diffusers get_scheduler", "[training][optim]") {
    const auto f = io::safetensors_file::open(golden_dir / "lr_schedules.safetensors");
    const auto cfg = config_of(f);
    const double base = cfg.at("base_lr").get<double>();
    REQUIRE(cfg.at("cases").size() == 5);
    for (const auto& [name, c] : cfg.at("cases").items()) {
        const training::lr_schedule s{.kind = training::lr_schedule_kind_from_name(c.at("kind").get<std::string>()),
                                      .base_lr = base,
                                      .warmup_steps = c.at("num_warmup_steps").get<std::int64_t>(),
                                      .total_steps = c.at("num_training_steps").get<std::int64_t>()};
        const auto want = f.to_vector<double>("output." + name);
        double worst = 0.0;
        for (std::size_t k = 0; k < want.size(); ++k)
            worst = std::max(worst, std::abs(s.lr(static_cast<std::int64_t>(k)) - want[k]) / base);
        INFO(name << " worst |lr - torch| / base_lr = " << worst);
        CHECK(worst <= 1e-15);
    }
    CHECK_THROWS_WITH(training::lr_schedule_kind_from_name("polynomial"), Catch::Contains("[lr_schedule] unknown schedule"));
    CHECK_THROWS_AS(training::lr_schedule{}.lr(-1), dynamicid::value_error);
}

TEST_CASE("loss_scaler follows torch GradScaler through injected overflows", "[training][optim]") {
    cpu_backend::context ctx;
    const auto f = io::safetensors_file::open(golden_dir / "grad_scaler.safetensors");
    const auto cfg = config_of(f);
    const auto steps = cfg.at("steps").get<std::size_t>();
    auto p = f.load<cpu_backend, float>(ctx, "input.param");
    training::adamw<cpu_backend, float> opt(ctx, {p},
                                            {.lr = cfg.at("lr").get<double>(), .weight_decay = cfg.at("weight_decay").get<double>()});
    training::loss_scaler scaler({.init_scale = cfg.at("init_scale").get<double>(),
                                  .growth_factor = cfg.at("growth_factor").get<double>(),
                                  .backoff_factor = cfg.at("backoff_factor").get<double>(),
                                  .growth_interval = cfg.at("growth_interval").get<std::int64_t>()});
    const auto scales = f.to_vector<double>("output.scale");
    const auto stepped = f.to_vector<float>("output.stepped");
    double worst = 0.0;
    for (std::size_t k = 0; k < steps; ++k) {
        CHECK(scaler.scale() == scales[k]);
        auto g = row(f, "input.grad", k);
        for (auto& v : g) v *= static_cast<float>(scaler.scale());  // the backward of scale * loss
        std::vector<tensor<float>> grads{tensor<float>::from_host(ctx, p.shape(), g)};
        CHECK(scaler.unscale(ctx, grads) == (stepped[k] == 0.0f));
        CHECK(scaler.step(ctx, opt, grads) == (stepped[k] == 1.0f));
        scaler.update();
        worst = std::max(worst, max_rel(p.to_host(ctx), row(f, "output.param", k)));
    }
    INFO("worst param rel " << worst);
    CHECK(worst < 1e-6);
    CHECK(scaler.scale() == f.to_vector<double>("output.final_scale")[0]);

    CHECK_THROWS_WITH(scaler.update(), Catch::Contains("[loss_scaler] update() without unscale()"));
    std::vector<tensor<float>> grads{tensor<float>::zeros(ctx, p.shape())};
    scaler.unscale(ctx, grads);
    CHECK_THROWS_WITH(scaler.unscale(ctx, grads), Catch::Contains("already called"));
    CHECK_THROWS_AS(training::loss_scaler({.backoff_factor = 1.5}), dynamicid::value_error);
}

TEST_CASE("loss_scaler defaults and f16 overflow detection", "[training][optim]") {
    cpu_backend::context ctx;
    training::loss_scaler scaler;
    CHECK(scaler.scale() == 65536.0);
    // 2000 clean iterations double the scale; one overflow halves it.
    std::vector<tensor<dynamicid::half>> grads{tensor<dynamicid::half>::full(ctx, {3}, dynamicid::half(1.0f))};
    for (int k = 0; k < 2000; ++k) {
        CHECK_FALSE(scaler.unscale(ctx, std::vector<tensor<dynamicid::half>>{}));
        scaler.update();
    }
    CHECK(scaler.scale() == 131072.0);
    // 70000 does not fit in f16: the scaled gradient is inf there.
    const std::vector<dynamicid::half> scaled{dynamicid::half(1.0f), dynamicid::half(70000.0f), dynamicid::half(2.0f)};
    grads[0] = tensor<dynamicid::half>::from_host(ctx, {3}, scaled);
    CHECK(scaler.unscale(ctx, grads));
    scaler.update();
    CHECK(scaler.scale() == 65536.0);
    CHECK(scaler.growth_tracker() == 0);

    training::loss_scaler off({.enabled = false});
    CHECK(off.scale() == 1.0);
    CHECK_FALSE(off.unscale(ctx, grads));
    off.update();
}

namespace {

// A three-rank stand-in: every "rank" holds the same gradients, so a sum is x3;
// records the order and sizes of started reductions and when they were waited on.
struct loopback_communicator {
    struct request {
        std::size_t id = 0;
    };
    static constexpr training::memory_space memory = training::memory_space::host;
    std::vector<std::size_t> started_sizes;
    std::vector<std::size_t> waited;

    int rank() const { return 0; }
    int size() const { return 3; }
    template <class T>
    request start_allreduce_sum(std::span<T> s) {
        for (auto& v : s) v = T(float(v) * 3.0f);
        started_sizes.push_back(s.size());
        return {started_sizes.size() - 1};
    }
    void wait(request& r) { waited.push_back(r.id); }
    template <class T>
    void allreduce_sum(std::span<T> s) {
        for (auto& v : s) v = T(float(v) * 3.0f);
    }
    template <class T>
    void broadcast(std::span<T>, int) {}
    void barrier() {}
};
static_assert(training::communicator<loopback_communicator>);

}  // namespace

TEST_CASE("gradient_bucketer packs in reverse order and starts full buckets early", "[training][optim]") {
    cpu_backend::context ctx;
    loopback_communicator comm;
    // Sizes in floats: 10, 3, 8, 2 -> reverse packing with 32-byte buckets: {3: 2, 2: 8}, {1: 3, 0: 10}.
    const std::vector<index_t> numels{10, 3, 8, 2};
    training::gradient_bucketer<cpu_backend, float, loopback_communicator> buckets(comm, numels, {.bucket_bytes = 32});
    REQUIRE(buckets.bucket_count() == 2);
    CHECK(buckets.bucket_params(0) == std::vector<std::size_t>{3, 2});
    CHECK(buckets.bucket_params(1) == std::vector<std::size_t>{1, 0});

    for (int iteration = 0; iteration < 2; ++iteration) {
        comm.started_sizes.clear();
        std::vector<tensor<float>> grads;
        std::vector<std::vector<float>> values;
        for (std::size_t i = 0; i < numels.size(); ++i) {
            values.emplace_back(static_cast<std::size_t>(numels[i]));
            for (std::size_t e = 0; e < values.back().size(); ++e) values.back()[e] = float(i * 100 + e) + 0.25f;
            grads.push_back(tensor<float>::from_host(ctx, {numels[i]}, values.back()));
        }
        auto ready = buckets.callback(ctx);
        ready(3, grads[3]);
        CHECK(buckets.buckets_started() == 0);
        ready(2, grads[2]);
        CHECK(buckets.buckets_started() == 1);  // started while the backward goes on
        CHECK(comm.started_sizes == std::vector<std::size_t>{10});
        ready(0, grads[0]);  // out of order within a bucket is fine
        ready(1, grads[1]);
        CHECK(buckets.buckets_started() == 2);
        buckets.finish(ctx);
        for (std::size_t i = 0; i < numels.size(); ++i) CHECK(grads[i].to_host(ctx) == values[i]);  // 3x / 3
    }

    auto g = tensor<float>::zeros(ctx, {3});
    CHECK_THROWS_AS(buckets.grad_ready(ctx, 0, g), dynamicid::shape_error);
    buckets.grad_ready(ctx, 1, g);
    CHECK_THROWS_WITH(buckets.grad_ready(ctx, 1, g), Catch::Contains("arrived twice"));
    CHECK_THROWS_WITH(buckets.finish(ctx), Catch::Contains("[gradient_bucketer] the gradient of parameter 0 never arrived"));
    CHECK_THROWS_WITH(buckets.grad_ready(ctx, 9, g), Catch::Contains("out of range"));
}

TEST_CASE("single_process_communicator leaves gradients alone", "[training][optim]") {
    cpu_backend::context ctx;
    training::single_process_communicator comm;
    auto a = tensor<double>::full(ctx, {4}, 1.5);
    auto b = tensor<double>::full(ctx, {2, 2}, -2.0);
    training::gradient_bucketer<cpu_backend, double, training::single_process_communicator> buckets(comm, std::vector{a, b});
    CHECK(buckets.bucket_count() == 1);
    buckets.grad_ready(ctx, 1, b);
    buckets.grad_ready(ctx, 0, a);
    buckets.finish(ctx);
    CHECK(a.to_host(ctx) == std::vector<double>(4, 1.5));
    training::allreduce_average(ctx, comm, b);
    training::broadcast(ctx, comm, b, 0);
    CHECK(b.to_host(ctx) == std::vector<double>(4, -2.0));
    CHECK_THROWS_AS(training::broadcast(ctx, comm, b, 1), dynamicid::value_error);
}
