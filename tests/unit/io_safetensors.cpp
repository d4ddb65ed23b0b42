#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/io/safetensors.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
using dynamicid::bfloat16;
using dynamicid::dtype;
using dynamicid::half;
using dynamicid::io::safetensors_file;
using dynamicid::io::safetensors_options;
using dynamicid::io::safetensors_writer;

namespace {

// A private directory per test, removed when the test ends.
struct scratch_dir {
    fs::path path;
    scratch_dir() {
        static std::atomic<int> counter{0};
        path = fs::temp_directory_path() /
               ("dynamicid_io_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter.fetch_add(1)));
        fs::create_directories(path);
    }
    ~scratch_dir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
};

std::vector<std::byte> framed(const std::string& header, const std::vector<std::byte>& data = {}) {
    std::vector<std::byte> out(8);
    std::uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = std::byte(static_cast<unsigned char>(n >> (8 * i)));
    for (char c : header) out.push_back(std::byte(static_cast<unsigned char>(c)));
    out.insert(out.end(), data.begin(), data.end());
    return out;
}

std::vector<std::byte> raw(const void* p, std::size_t n) {
    std::vector<std::byte> out(n);
    std::memcpy(out.data(), p, n);
    return out;
}

template <class T>
void round_trip_one(dtype expected, const std::vector<T>& values, const dynamicid::shape& dims) {
    scratch_dir dir;
    const fs::path path = dir.path / "one.safetensors";
    safetensors_writer w;
    w.add("t", dims, values);
    w.write(path);
    const auto f = safetensors_file::open(path);
    REQUIRE(f.names() == std::vector<std::string>{"t"});
    const auto& ti = f.info("t");
    CHECK(ti.name == "t");
    CHECK(ti.type == expected);
    CHECK(ti.dims == dims);
    CHECK(ti.bytes == values.size() * dynamicid::size_of(expected));
    CHECK(f.to_vector<T>("t") == values);
}

}  // namespace

TEST_CASE("safetensors round-trips every dtype", "[safetensors]") {
    round_trip_one<double>(dtype::f64, {1.5, -2.25, 1e300, 0.0, -0.0, 7.0}, {2, 3});
    round_trip_one<float>(dtype::f32, {1.5f, -2.25f, 3.0e38f, std::numeric_limits<float>::denorm_min()}, {4});
    round_trip_one<half>(dtype::f16, {half(1.0f), half(-0.5f), half(65504.0f), half::from_bits(0x0001)}, {2, 2});
    round_trip_one<bfloat16>(dtype::bf16, {bfloat16(1.0f), bfloat16(-3.0e38f), bfloat16(0.1f)}, {3, 1});
    round_trip_one<std::int64_t>(dtype::i64,
                                 {std::numeric_limits<std::int64_t>::min(), -1, 0, std::numeric_limits<std::int64_t>::max()},
                                 {2, 1, 2});
    round_trip_one<std::int32_t>(dtype::i32, {std::numeric_limits<std::int32_t>::min(), 7, 42}, {3});
    round_trip_one<std::uint8_t>(dtype::u8, {0, 1, 128, 255, 9}, {5});
    const bool flags[] = {true, false, true};
    scratch_dir dir;
    safetensors_writer w;
    w.add("flags", {3}, flags);
    w.write(dir.path / "b.safetensors");
    const auto f = safetensors_file::open(dir.path / "b.safetensors");
    CHECK(f.info("flags").type == dtype::boolean);
    CHECK(f.to_vector<bool>("flags") == std::vector<bool>{true, false, true});
    CHECK(f.to_vector<float>("flags") == std::vector<float>{1.0f, 0.0f, 1.0f});
}

TEST_CASE("safetensors round-trips metadata, several tensors and empty tensors", "[safetensors]") {
    scratch_dir dir;
    const fs::path path = dir.path / "multi.safetensors";
    const std::vector<float> weights{1, 2, 3, 4, 5, 6};
    const std::vector<half> halves{half(0.25f), half(-8.0f)};
    const std::vector<std::uint8_t> bytes{1, 2, 3};
    const std::vector<float> none;
    safetensors_writer w;
    w.add("w", {2, 3}, weights).add("h", {2}, halves).add("b", {3}, bytes).add("empty", {0, 4}, none);
    w.add("scalar", dynamicid::shape{}, std::vector<double>{3.5});
    w.set_metadata("format", "pt").set_metadata("note", "héllo \"quoted\"");
    w.write(path);

    const auto f = safetensors_file::open(path);
    CHECK(f.size() == 5);
    CHECK(f.names() == std::vector<std::string>{"b", "empty", "h", "scalar", "w"});  // sorted by name
    CHECK(f.contains("w"));
    CHECK_FALSE(f.contains("missing"));
    CHECK(f.metadata() == std::map<std::string, std::string>{{"format", "pt"}, {"note", "héllo \"quoted\""}});
    CHECK(f.to_vector<float>("w") == weights);
    CHECK(f.to_vector<half>("h") == halves);
    CHECK(f.to_vector<std::uint8_t>("b") == bytes);
    CHECK(f.info("empty").dims == dynamicid::shape{0, 4});
    CHECK(f.info("empty").bytes == 0);
    CHECK(f.to_vector<float>("empty").empty());
    CHECK(f.bytes("empty").empty());
    CHECK(f.info("scalar").dims.rank() == 0);
    CHECK(f.to_vector<double>("scalar") == std::vector<double>{3.5});
    CHECK(f.bytes("w").size() == 24);

    // Tensors are laid out largest element first, each naturally aligned, and
    // the header is space-padded so the data section starts 8-byte aligned.
    const auto all = w.to_bytes();
    std::uint64_t n = 0;
    std::memcpy(&n, all.data(), 8);
    CHECK(n % 8 == 0);
    CHECK(static_cast<char>(all[8 + n - 1]) != '\0');
    for (const auto& name : f.names()) CHECK(f.info(name).offset % dynamicid::size_of(f.info(name).type) == 0);
    CHECK(fs::file_size(path) == all.size());
}

TEST_CASE("safetensors converts stored dtypes on read", "[safetensors]") {
    safetensors_writer w;
    w.add("f16", {3}, std::vector<half>{half(1.5f), half(-2.0f), half(0.0f)});
    w.add("bf16", {2}, std::vector<bfloat16>{bfloat16(3.0f), bfloat16(-0.5f)});
    w.add("f64", {2}, std::vector<double>{0.1, -1e10});
    w.add("i64", {3}, std::vector<std::int64_t>{-5, 0, std::int64_t{1} << 40});
    w.add("i32", {2}, std::vector<std::int32_t>{-7, 300});
    w.add("u8", {2}, std::vector<std::uint8_t>{0, 255});
    const auto f = safetensors_file::from_memory(w.to_bytes());

    CHECK(f.to_vector<float>("f16") == std::vector<float>{1.5f, -2.0f, 0.0f});
    CHECK(f.to_vector<double>("bf16") == std::vector<double>{3.0, -0.5});
    CHECK(f.to_vector<float>("f64") == std::vector<float>{0.1f, -1e10f});
    CHECK(f.to_vector<half>("f64")[0] == half(0.1f));
    CHECK(f.to_vector<bfloat16>("i32") == std::vector<bfloat16>{bfloat16(-7.0f), bfloat16(300.0f)});
    CHECK(f.to_vector<double>("i64") == std::vector<double>{-5.0, 0.0, 1099511627776.0});
    CHECK(f.to_vector<std::int64_t>("i32") == std::vector<std::int64_t>{-7, 300});
    CHECK(f.to_vector<std::int32_t>("u8") == std::vector<std::int32_t>{0, 255});
    CHECK(f.to_vector<bool>("u8") == std::vector<bool>{false, true});

    // Narrowing that loses a value is refused, as is reading floats as integers.
    CHECK_THROWS_AS(f.to_vector<std::int32_t>("i64"), dynamicid::value_error);
    CHECK_THROWS_AS(f.to_vector<std::uint8_t>("i32"), dynamicid::value_error);
    CHECK_THROWS_AS(f.to_vector<std::int32_t>("f16"), dynamicid::shape_error);
    CHECK_THROWS_AS(f.to_vector<float>("nope"), dynamicid::io_error);
    CHECK_THROWS_WITH(f.info("nope"), Catch::Contains("[safetensors]") && Catch::Contains("nope"));
}

TEST_CASE("safetensors reads unaligned tensors", "[safetensors]") {
    // One u8 byte first pushes the f32 and f64 tensors to odd offsets.
    const float f32[] = {1.25f, -3.5f};
    const double f64[] = {2.5};
    std::vector<std::byte> data{std::byte{7}};
    const auto a = raw(f32, sizeof f32), b = raw(f64, sizeof f64);
    data.insert(data.end(), a.begin(), a.end());
    data.insert(data.end(), b.begin(), b.end());
    const std::string header = R"({"u":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                               R"("f":{"dtype":"F32","shape":[2],"data_offsets":[1,9]},)"
                               R"("d":{"dtype":"F64","shape":[1,1],"data_offsets":[9,17]}} )";
    const auto f = safetensors_file::from_memory(framed(header, data));
    CHECK(f.to_vector<float>("f") == std::vector<float>{1.25f, -3.5f});
    CHECK(f.to_vector<double>("d") == std::vector<double>{2.5});
    CHECK(f.to_vector<float>("u") == std::vector<float>{7.0f});
    CHECK(f.info("f").offset == 1);
}

TEST_CASE("safetensors loads into backend tensors and writes them back", "[safetensors]") {
    dynamicid::cpu_backend::context ctx{.threads = 1};
    using tensor = dynamicid::tensor<dynamicid::cpu_backend, float>;
    const auto x = tensor::from_host(ctx, {2, 2}, std::vector<float>{1, 2, 3, 4});
    safetensors_writer w;
    w.add(ctx, "x", x);
    w.add("x16", {2, 2}, std::vector<half>{half(1.0f), half(2.0f), half(3.0f), half(4.0f)});
    const auto f = safetensors_file::from_memory(w.to_bytes());

    const auto y = f.load<dynamicid::cpu_backend, float>(ctx, "x");
    CHECK(y.shape() == x.shape());
    CHECK(y.to_host(ctx) == x.to_host(ctx));
    const auto y16 = f.load<dynamicid::cpu_backend, float>(ctx, "x16");  // f16 storage widened on the host
    CHECK(y16.to_host(ctx) == std::vector<float>{1, 2, 3, 4});
    const auto h = f.load<dynamicid::cpu_backend, half>(ctx, "x");
    CHECK(h.to_host(ctx)[3] == half(4.0f));
}

TEST_CASE("safetensors_file is movable and keeps its bytes", "[safetensors]") {
    safetensors_writer w;
    w.add("a", {2}, std::vector<float>{1, 2});
    scratch_dir dir;
    w.write(dir.path / "m.safetensors");
    auto f = safetensors_file::open(dir.path / "m.safetensors");
    const auto span = f.bytes("a");
    safetensors_file g = std::move(f);
    CHECK(g.bytes("a").data() == span.data());
    CHECK(g.to_vector<float>("a") == std::vector<float>{1, 2});
    safetensors_file h;
    h = std::move(g);
    CHECK(h.source() == (dir.path / "m.safetensors").string());
    static_assert(!std::is_copy_constructible_v<safetensors_file>);
    static_assert(std::is_nothrow_move_constructible_v<safetensors_file>);
}

TEST_CASE("safetensors writer replaces files atomically and reports errors", "[safetensors]") {
    scratch_dir dir;
    const fs::path path = dir.path / "w.safetensors";
    std::ofstream(path) << "old contents";
    safetensors_writer w;
    w.add("a", {1}, std::vector<float>{9});
    w.write(path);
    CHECK(safetensors_file::open(path).to_vector<float>("a") == std::vector<float>{9});
    std::size_t entries = 0;
    for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir.path)) ++entries;
    CHECK(entries == 1);  // no temporary file left behind

    CHECK_THROWS_AS(w.write(dir.path / "no" / "such" / "dir.safetensors"), dynamicid::io_error);
    CHECK_THROWS_AS(w.add("a", {1}, std::vector<float>{1}), dynamicid::value_error);
    CHECK_THROWS_AS(w.add("__metadata__", {1}, std::vector<float>{1}), dynamicid::value_error);
    CHECK_THROWS_AS(w.add("b", {2}, std::vector<float>{1}), dynamicid::value_error);
    const std::byte three[3]{};
    CHECK_THROWS_AS(w.add_bytes("c", dtype::f32, {1}, three), dynamicid::value_error);
    safetensors_writer bad;
    bad.set_metadata("k", std::string("\xff"));
    CHECK_THROWS_AS(bad.to_bytes(), dynamicid::value_error);
}

TEST_CASE("safetensors rejects missing files and non-files", "[safetensors]") {
    scratch_dir dir;
    const fs::path missing = dir.path / "absent.safetensors";
    CHECK_THROWS_AS(safetensors_file::open(missing), dynamicid::io_error);
    CHECK_THROWS_WITH(safetensors_file::open(missing),
                      Catch::StartsWith("[safetensors]") && Catch::Contains(missing.string()));
    CHECK_THROWS_AS(safetensors_file::open(dir.path), dynamicid::io_error);
}

TEST_CASE("safetensors header size cap is configurable", "[safetensors]") {
    safetensors_writer w;
    w.add("a", {1}, std::vector<float>{1});
    const auto bytes = w.to_bytes();
    safetensors_options small;
    small.max_header_bytes = 16;
    CHECK_THROWS_WITH(safetensors_file::from_memory(bytes, small), Catch::Contains("exceeds the limit of 16"));
    CHECK_NOTHROW(safetensors_file::from_memory(bytes));
}

TEST_CASE("safetensors rejects hostile headers with clear messages", "[safetensors]") {
    const auto rejects = [](const std::string& header, const std::string& needle, std::vector<std::byte> data = {}) {
        INFO(header);
        CHECK_THROWS_AS(safetensors_file::from_memory(framed(header, data)), dynamicid::io_error);
        CHECK_THROWS_WITH(safetensors_file::from_memory(framed(header, data)),
                          Catch::StartsWith("[safetensors] <memory>: ") && Catch::Contains(needle));
    };
    const std::vector<std::byte> eight(8);
    rejects("{", "not valid JSON");
    rejects("[]", "not a JSON object");
    rejects(R"({"a":1})", "not an object");
    rejects(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", "missing \"dtype\"", eight);
    rejects(R"({"a":{"dtype":"F8","shape":[2],"data_offsets":[0,8]}})", "unsupported dtype \"F8\"", eight);
    rejects(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", "negative integer", eight);
    rejects(R"({"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", "non-integer", eight);
    rejects(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", "overflows");
    rejects(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", "two integers", eight);
    rejects(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", "begin after end", eight);
    rejects(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", "past the data section", eight);
    rejects(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", "needs 12 bytes", eight);
    rejects(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}})",
            "overlap", eight);
    rejects(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
            "duplicate key 'a'", eight);
    rejects(R"({"__metadata__":{"k":1}})", "not a string");
    CHECK_THROWS_WITH(safetensors_file::from_memory(std::vector<std::byte>(5)), Catch::Contains("too short"));
}

TEST_CASE("safetensors accepts edge cases that are valid", "[safetensors]") {
    const std::vector<std::byte> eight(8);
    // Empty tensors may sit anywhere, even inside another tensor's range.
    const auto f = safetensors_file::from_memory(framed(
        R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"z":{"dtype":"F32","shape":[0,3],"data_offsets":[4,4]}}   )",
        eight));
    CHECK(f.size() == 2);
    CHECK(safetensors_file::from_memory(framed("{}")).size() == 0);
    // Unknown per-entry fields are ignored for forward compatibility.
    CHECK(safetensors_file::from_memory(
              framed(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":"x"}})", std::vector<std::byte>(1)))
              .size() == 1);
}

TEST_CASE("safetensors rejects every file in the hostile corpus with io_error", "[safetensors]") {
    const fs::path corpus = fs::path(DYNAMICID_TEST_DATA_DIR) / "bad_safetensors";
    REQUIRE(fs::is_directory(corpus));
    std::size_t count = 0;
    for (const auto& entry : fs::directory_iterator(corpus)) {
        if (!entry.is_regular_file()) continue;
        ++count;
        INFO(entry.path().filename().string());
        try {
            (void)safetensors_file::open(entry.path());
            FAIL("accepted a hostile file");
        } catch (const dynamicid::io_error& e) {
            CHECK(std::string(e.what()).rfind("[safetensors] ", 0) == 0);
            CHECK(e.component() == "safetensors");
        }
        std::ifstream in(entry.path(), std::ios::binary);
        std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        const auto* first = reinterpret_cast<const std::byte*>(chars.data());
        CHECK_THROWS_AS(safetensors_file::from_memory(std::span<const std::byte>(first, chars.size())), dynamicid::io_error);
    }
    CHECK(count >= 40);
}
