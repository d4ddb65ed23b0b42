// The conformance runner: torch primitive goldens (forward and gradients),
// the official ProjPlusModel goldens, and the runner's failure paths.
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/conform/conform.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace conform = dynamicid::conform;
using dynamicid::cpu_backend;
using dynamicid::dtype;

const fs::path golden_dir = fs::path(DYNAMICID_TEST_DATA_DIR) / "golden";

std::vector<fs::path> files_in(const fs::path& dir) {
    std::vector<fs::path> out;
    for (const auto& e : fs::directory_iterator(dir))
        if (e.path().extension() == ".safetensors") out.push_back(e.path());
    std::sort(out.begin(), out.end());
    return out;
}

const conform::registry<cpu_backend>& shared_registry() {
    static const auto r = conform::registry<cpu_backend>::builtin();
    return r;
}

void require_all_pass(const std::vector<conform::result>& results) {
    REQUIRE_FALSE(results.empty());
    for (const auto& r : results) {
        INFO(r.file << ' ' << r.name << " max_abs=" << r.max_abs << " max_rel=" << r.max_rel << ' ' << r.note);
        CHECK(r.pass);
    }
}

/// A copy of `g`'s file with each tensor passed through `edit` (name, values -> values),
/// stored as `as` (F64 or F32), and the config replaced by `config` when given.
conform::golden_case rewrite(const conform::golden_case& g, dtype as,
                             const std::function<void(const std::string&, std::vector<double>&)>& edit,
                             const std::string& config = {}) {
    dynamicid::io::safetensors_writer w;
    for (const auto& name : g.file().names()) {
        auto values = g.values(name);
        edit(name, values);
        if (as == dtype::f64) {
            w.add(name, g.dims(name), values);
        } else {
            std::vector<float> narrow(values.begin(), values.end());
            w.add(name, g.dims(name), narrow);
        }
    }
    w.set_metadata("config", config.empty() ? g.config().dump() : config);
    const auto bytes = w.to_bytes();
    return conform::golden_case("rewritten:" + g.file_name(), dynamicid::io::safetensors_file::from_memory(bytes));
}

}  // namespace

TEST_CASE("conform: every torch primitive golden passes (forward and gradients)", "[conform]") {
    const auto files = files_in(golden_dir / "torch");
    REQUIRE(files.size() >= 30);
    cpu_backend::context ctx{.threads = 2};
    std::size_t outputs = 0, gradients = 0;
    for (const auto& f : files) {
        const auto g = conform::golden_case::open(f);
        INFO(f.filename().string() << " (" << g.module() << ")");
        CHECK(g.float64());
        const auto results = conform::run_case(ctx, shared_registry(), g);
        require_all_pass(results);
        for (const auto& r : results) {
            ++outputs;
            if (r.name.rfind("output.grad_", 0) == 0) ++gradients;
            // float64 goldens are checked at the case's own tight tolerance.
            CHECK(r.atol <= 1e-9);
        }
    }
    CHECK(outputs >= 80);
    CHECK(gradients >= 50);
}

TEST_CASE("conform: official ProjPlusModel goldens pass", "[conform]") {
    cpu_backend::context ctx{.threads = 2};
    for (const char* name : {"proj_plain.safetensors", "proj_shortcut.safetensors"}) {
        const auto g = conform::golden_case::open(golden_dir / "official" / name);
        INFO(name);
        CHECK(g.module() == "ProjPlusModel");
        const auto results = conform::run_case(ctx, shared_registry(), g);
        REQUIRE(results.size() == 1);
        CHECK(results[0].name == "output.tokens");
        CHECK(results[0].atol == 1e-4);
        require_all_pass(results);
    }
}

TEST_CASE("conform: ProjPlusModel honours the shortcut setting", "[conform]") {
    // Running the shortcut case without its shortcut must fail: the flag is honoured.
    cpu_backend::context ctx{.threads = 2};
    const auto g = conform::golden_case::open(golden_dir / "official" / "proj_shortcut.safetensors");
    auto cfg = g.config();
    cfg["shortcut"] = false;
    const auto plain = rewrite(g, dtype::f32, [](const std::string&, std::vector<double>&) {}, cfg.dump());
    const auto results = conform::run_case(ctx, shared_registry(), plain);
    REQUIRE(results.size() == 1);
    CHECK_FALSE(results[0].pass);
}

TEST_CASE("conform: a perturbed reference output fails", "[conform]") {
    cpu_backend::context ctx{.threads = 2};
    const auto g = conform::golden_case::open(golden_dir / "torch" / "linear.safetensors");
    const auto bad = rewrite(g, dtype::f64, [](const std::string& name, std::vector<double>& v) {
        if (name == "output.grad_weight") v[3] += 1e-6;
    });
    const auto results = conform::run_case(ctx, shared_registry(), bad);
    REQUIRE(results.size() == 4);
    for (const auto& r : results) {
        INFO(r.name);
        if (r.name == "output.grad_weight") {
            CHECK_FALSE(r.pass);
            CHECK(r.max_abs == Approx(1e-6).epsilon(1e-6));
        } else {
            CHECK(r.pass);
        }
    }
    // A looser tolerance from the caller lets it pass again.
    conform::run_options loose;
    loose.atol = 1e-5;
    for (const auto& r : conform::run_case(ctx, shared_registry(), bad, loose)) CHECK(r.pass);
}

TEST_CASE("conform: float32 goldens run in float at the default 1e-4 tolerance", "[conform]") {
    cpu_backend::context ctx{.threads = 2};
    for (const char* name : {"conv2d_stride2_pad1_groups2", "layer_norm", "sdpa", "gelu_erf"}) {
        INFO(name);
        const auto g = conform::golden_case::open(golden_dir / "torch" / (std::string(name) + ".safetensors"));
        auto cfg = g.config();
        cfg.erase("atol");
        cfg.erase("rtol");
        const auto f32 = rewrite(g, dtype::f32, [](const std::string&, std::vector<double>&) {}, cfg.dump());
        CHECK_FALSE(f32.float64());
        const auto results = conform::run_case(ctx, shared_registry(), f32);
        require_all_pass(results);
        for (const auto& r : results) {
            CHECK(r.atol == 1e-4);
            CHECK(r.rtol == 1e-4);
            CHECK(r.max_abs > 0.0);  // computed in float, so not bit-identical to the float64 reference
        }
    }
}

TEST_CASE("conform: an unknown module throws unsupported_module", "[conform]") {
    cpu_backend::context ctx{.threads = 2};
    const auto g = conform::golden_case::open(golden_dir / "misc" / "unsupported_module.safetensors");
    CHECK(g.module() == "nonexistent.module.for_tests");
    CHECK_FALSE(shared_registry().contains(g.module()));
    CHECK_THROWS_AS(conform::run_case(ctx, shared_registry(), g), conform::unsupported_module);
    try {
        conform::run_case(ctx, shared_registry(), g);
        FAIL("no exception");
    } catch (const dynamicid::unsupported_error& e) {
        CHECK(std::string(e.what()).rfind("[conform] ", 0) == 0);
        CHECK(std::string(e.what()).find("nonexistent.module.for_tests") != std::string::npos);
        CHECK(e.component() == "conform");
    }
}

TEST_CASE("conform: the registry lists every primitive module", "[conform]") {
    const auto& r = shared_registry();
    for (const char* m : {"torch.nn.functional.linear", "torch.matmul", "torch.nn.functional.conv2d", "torch.nn.functional.group_norm",
                          "torch.nn.functional.layer_norm", "torch.softmax", "torch.nn.functional.silu", "torch.nn.functional.gelu",
                          "quick_gelu", "torch.nn.functional.relu", "torch.sigmoid", "torch.tanh", "geglu", "torch.add", "torch.mul",
                          "torch.div", "torch.sum", "torch.mean", "torch.permute", "torch.cat", "torch.nn.functional.interpolate",
                          "torch.nn.functional.scaled_dot_product_attention", "ProjPlusModel"}) {
        INFO(m);
        CHECK(r.contains(m));
    }
    // A caller may add a module of its own.
    auto custom = conform::registry<cpu_backend>::builtin();
    custom.add("nonexistent.module.for_tests", [](cpu_backend::context& ctx, const conform::golden_case& g) {
        conform::output_map<cpu_backend> out;
        out.emplace("y", g.load<cpu_backend, double>(ctx, "input.x"));
        return out;
    });
    cpu_backend::context ctx{.threads = 1};
    const auto g = conform::golden_case::open(golden_dir / "misc" / "unsupported_module.safetensors");
    require_all_pass(conform::run_case(ctx, custom, g));
}

TEST_CASE("conform: compare applies max|out-ref| <= atol + rtol*max|ref|", "[conform]") {
    const std::vector<double> ref{1.0, -2.0, 4.0};
    CHECK(conform::compare("f", "output.y", {1.0, -2.0, 4.0}, ref, 0.0, 0.0).pass);
    auto r = conform::compare("f", "output.y", {1.0, -2.0, 4.5}, ref, 0.1, 0.1);  // bound 0.1 + 0.4
    CHECK(r.pass);
    CHECK(r.max_abs == 0.5);
    CHECK(r.max_rel == 0.125);
    CHECK_FALSE(conform::compare("f", "output.y", {1.0, -2.0, 4.51}, ref, 0.1, 0.1).pass);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    CHECK_FALSE(conform::compare("f", "output.y", {1.0, nan, 4.0}, ref, 1.0, 1.0).pass);
    CHECK_FALSE(conform::compare("f", "output.y", {1.0, -2.0}, ref, 1.0, 1.0).pass);
    CHECK(conform::compare("f", "output.y", {0.0, 0.0}, {0.0, 0.0}, 0.0, 0.0).max_rel == 0.0);
}

TEST_CASE("conform: an unreadable golden file is an io_error", "[conform]") {
    CHECK_THROWS_AS(conform::golden_case::open(golden_dir / "does_not_exist.safetensors"), dynamicid::io_error);
    dynamicid::io::safetensors_writer w;
    w.add("input.x", {1}, std::vector<double>{1.0});
    const auto bytes = w.to_bytes();
    CHECK_THROWS_AS(conform::golden_case("no-config", dynamicid::io::safetensors_file::from_memory(bytes)), dynamicid::io_error);
}
