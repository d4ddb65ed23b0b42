// Reading torch.save checkpoints without executing pickle code. Fixtures come
// from tools/golden/make_pickle_fixtures.py (tests/data/pickle/).
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/io/torch_checkpoint.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
using dynamicid::dtype;
using dynamicid::shape;
using dynamicid::io::safetensors_file;
using dynamicid::io::torch_checkpoint;
using dynamicid::io::torch_node;

namespace {

fs::path fixture(const std::string& name) { return fs::path(DYNAMICID_TEST_DATA_DIR) / "pickle" / name; }

std::vector<std::byte> read_all(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<std::byte> out(c.size());
    std::memcpy(out.data(), c.data(), c.size());
    return out;
}

struct scratch_dir {
    fs::path path;
    scratch_dir() {
        static std::atomic<int> counter{0};
        path = fs::temp_directory_path() /
               ("dynamicid_pickle_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter.fetch_add(1)));
        fs::create_directories(path);
    }
    ~scratch_dir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
};

// Every tensor of `ckpt` equals (dtype, shape, bytes) the one of the same name in `expected`, and no name is missing.
void require_same_tensors(const torch_checkpoint& ckpt, const safetensors_file& expected) {
    const auto tensors = ckpt.flatten();
    REQUIRE(tensors.size() == expected.size());
    for (const auto& [name, t] : tensors) {
        INFO(name);
        REQUIRE(expected.contains(name));
        const auto& info = expected.info(name);
        CHECK(t.type() == info.type);
        CHECK(t.dims() == info.dims);
        const auto got = t.contiguous_bytes();
        const auto want = expected.bytes(name);
        REQUIRE(got.size() == want.size());
        CHECK((got.empty() || std::memcmp(got.data(), want.data(), got.size()) == 0));
    }
}

void require_refused(const std::string& file, const std::string& needle) {
    INFO(file);
    try {
        (void)torch_checkpoint::open(fixture(file));
        FAIL("no exception");
    } catch (const dynamicid::io_error& e) {
        const std::string what = e.what();
        INFO(what);
        CHECK(what.find(needle) != std::string::npos);
    }
}

}  // namespace

TEST_CASE("torch_checkpoint reads an SAA.bin-shaped zip checkpoint exactly", "[pickle]") {
    const auto ckpt = torch_checkpoint::open(fixture("saa_like.bin"));
    CHECK(ckpt.format() == "zip");
    const auto expected = safetensors_file::open(fixture("saa_like.safetensors"));
    require_same_tensors(ckpt, expected);

    const torch_node& root = ckpt.root();
    REQUIRE(root.is_dict());
    REQUIRE(root.keys() == std::vector<std::string>{"proj_module", "SAA_module"});

    const auto& proj = ckpt.subtree("proj_module");
    const auto& transposed = proj.at("extra.transposed").tensor();
    CHECK_FALSE(transposed.is_contiguous());
    CHECK(transposed.dims() == shape{5, 3});
    CHECK(transposed.strides() == std::vector<dynamicid::index_t>{1, 5});

    const auto& column = proj.at("extra.column").tensor();
    CHECK(column.storage_offset() == 2);
    CHECK(column.strides() == std::vector<dynamicid::index_t>{6});

    const auto& a = proj.at("extra.shared_a").tensor();
    const auto& b = proj.at("extra.shared_b").tensor();
    CHECK(a.storage_key() == b.storage_key());
    CHECK(a.storage_bytes().data() == b.storage_bytes().data());  // one storage, not copied
    CHECK(b.storage_offset() == 6);

    CHECK(proj.at("extra.empty").tensor().dims() == shape{0, 3});
    CHECK(proj.at("extra.empty").tensor().contiguous_bytes().empty());

    const auto& saa = ckpt.subtree("SAA_module");
    CHECK(saa.at("1.num_batches_tracked").tensor().type() == dtype::i64);
    CHECK(saa.at("1.num_batches_tracked").tensor().to_vector<std::int64_t>() == std::vector<std::int64_t>{7});
    CHECK(saa.at("0.scalar").tensor().dims().rank() == 0);
    CHECK(saa.at("0.scalar").tensor().to_vector<float>() == std::vector<float>{1.5f});
    CHECK(saa.at("0.bool").tensor().to_vector<bool>() == std::vector<bool>{true, false, true});
    CHECK(saa.at("0.bf16_t").tensor().type() == dtype::bf16);
    CHECK_THROWS_AS(saa.at("0.half").tensor().to_vector<std::int32_t>(), dynamicid::shape_error);
    CHECK_THROWS_AS(ckpt.subtree("proj_module.nope"), dynamicid::io_error);
}

TEST_CASE("torch_checkpoint reads the legacy, deflated, ZIP64 and big-endian variants", "[pickle]") {
    const auto expected = safetensors_file::open(fixture("saa_like.safetensors"));
    const auto legacy = torch_checkpoint::open(fixture("saa_like_legacy.bin"));
    CHECK(legacy.format() == "legacy");
    require_same_tensors(legacy, expected);
    require_same_tensors(torch_checkpoint::open(fixture("saa_like_deflate.bin")), expected);
    require_same_tensors(torch_checkpoint::open(fixture("saa_like_big.bin")), expected);
    require_same_tensors(torch_checkpoint::open(fixture("saa_like_zip64.bin")), expected);
    dynamicid::io::torch_checkpoint_options opts;
    opts.verify_crc = true;
    require_same_tensors(torch_checkpoint::open(fixture("saa_like.bin"), opts), expected);
    require_same_tensors(torch_checkpoint::from_memory(read_all(fixture("saa_like.bin"))), expected);
}

TEST_CASE("torch_checkpoint reads protocol 4, parameters, lists and scalars", "[pickle]") {
    const auto ckpt = torch_checkpoint::open(fixture("misc_p4.bin"));
    require_same_tensors(ckpt, safetensors_file::open(fixture("misc_p4.safetensors")));
    const auto& root = ckpt.root();
    CHECK(root.at("step").integer() == 5);
    CHECK(root.at("lr").real() == 0.5);
    CHECK(root.at("name").string() == "dynamicid");
    CHECK(root.at("flag").boolean());
    CHECK(root.at("nothing").type() == torch_node::kind::none);
    CHECK(root.at("list").is_list());
    CHECK(root.at("7").is_tensor());  // int keys are spelt in decimal
    CHECK(ckpt.flatten().count("list.1.0") == 1);
    CHECK(ckpt.flatten("/").count("nested/a/b/c") == 1);
    CHECK_THROWS_AS(root.at("step").tensor(), dynamicid::io_error);
}

TEST_CASE("torch_checkpoint converts to safetensors and serves as a weight_source", "[pickle]") {
    scratch_dir dir;
    const auto out = dir.path / "proj.safetensors";
    dynamicid::io::convert_to_safetensors(fixture("saa_like.bin"), out, "proj_module");
    const auto converted = safetensors_file::open(out);
    const auto expected = safetensors_file::open(fixture("saa_like.safetensors"));
    CHECK(converted.contains("extra.transposed"));
    CHECK_FALSE(converted.contains("SAA_module.0.weight"));
    for (const auto& name : converted.names()) {
        INFO(name);
        const auto want = expected.bytes("proj_module." + name);
        const auto got = converted.bytes(name);
        REQUIRE(got.size() == want.size());
        CHECK((got.empty() || std::memcmp(got.data(), want.data(), got.size()) == 0));
    }

    const auto ckpt = torch_checkpoint::open(fixture("saa_like.bin"));
    const auto source = dynamicid::io::torch_weight_source(ckpt, "SAA_module");
    dynamicid::cpu_backend::context ctx;
    dynamicid::modules::weight_binder<dynamicid::cpu_backend, float> bind(ctx, source);
    const auto w = bind.tensor("0.weight", {5, 3});
    const auto t = bind.tensor("0.bf16_t", {3, 2, 2});
    bind.finish();
    CHECK(w.to_host(ctx) == expected.to_vector<float>("SAA_module.0.weight"));
    CHECK(t.to_host(ctx) == expected.to_vector<float>("SAA_module.0.bf16_t"));
    CHECK(dynamicid::io::open_torch_weights(fixture("saa_like_legacy.bin"), "proj_module").contains("0.weight"));
}

TEST_CASE("torch_checkpoint refuses hostile files without running them", "[pickle]") {
    require_refused("evil_os_system.bin", "refusing global 'posix.system'");
    require_refused("evil_eval.bin", "refusing global '__builtin__.eval'");  // protocol 2 spells builtins so
    require_refused("evil_plain_object.bin", "refusing global '__main__.Plain'");
    require_refused("truncated.bin", "not a ZIP archive, or truncated");
    require_refused("entry_past_eof.bin", "past the end of the file");
    require_refused("unknown_opcode.bin", "unknown pickle opcode 0xff");
    require_refused("deep_nesting.bin", "nests deeper than 64");
    require_refused("huge_memo_index.bin", "memo key 4294967295 was never stored");
    require_refused("view_past_storage.bin", "reaches element 5 of storage '0', which holds 4");
    require_refused("short_storage.bin", "should hold 6 F32 elements but its record is 16 bytes");
    require_refused("legacy_truncated.bin", "truncated");
    require_refused("saa_like.safetensors", "not a PyTorch checkpoint");
    // Messages carry the component.
    try {
        (void)torch_checkpoint::open(fixture("evil_eval.bin"));
    } catch (const dynamicid::io_error& e) {
        CHECK(e.component() == "pickle");
    }
}

TEST_CASE("torch_checkpoint survives every truncation and single-byte corruption of a checkpoint", "[pickle]") {
    // Any outcome but a crash or a non-dynamicid exception is fine.
    for (const char* name : {"saa_like.bin", "saa_like_legacy.bin", "saa_like_zip64.bin", "saa_like_deflate.bin", "misc_p4.bin"}) {
        const auto good = read_all(fixture(name));
        for (std::size_t cut = 0; cut < good.size(); cut += 7) {
            try {
                (void)torch_checkpoint::from_memory(std::span<const std::byte>(good).first(cut));
            } catch (const dynamicid::error&) {
            }
        }
        for (std::size_t at = 0; at < good.size(); at += 3) {
            auto bad = good;
            bad[at] ^= std::byte{0x5a};
            try {
                const auto ckpt = torch_checkpoint::from_memory(bad);
                for (const auto& [n, t] : ckpt.flatten()) (void)t.contiguous_bytes();
            } catch (const dynamicid::error&) {
            }
        }
    }
}
