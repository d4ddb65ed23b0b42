// CLIP tokenizer: transformers goldens (SD1.5 vocabulary, ill-formed UTF-8, a
// diffusers-style vocab.json + merges.txt folder) and the error paths.
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/conform/conform.hpp>
#include <dynamicid/text/clip_tokenizer.hpp>

#include <catch2/catch.hpp>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using dynamicid::text::clip_tokenizer;

const fs::path golden_dir = fs::path(DYNAMICID_TEST_DATA_DIR) / "golden" / "tokenizer";
// The vocabulary the library ships (the source tree's data/), independent of DYNAMICID_DATA_DIR.
const fs::path shipped_data_dir = fs::path(DYNAMICID_TEST_DATA_DIR) / ".." / ".." / "data";

const clip_tokenizer& sd15() {
    static const clip_tokenizer tok = clip_tokenizer::load_default(shipped_data_dir);
    return tok;
}

std::vector<std::int64_t> golden_ids(const dynamicid::conform::golden_case& g) {
    std::vector<std::int64_t> out;
    for (double v : g.values("output.input_ids")) out.push_back(static_cast<std::int64_t>(v));
    return out;
}

void check_rows(const std::vector<std::string>& prompts, const std::vector<std::int64_t>& got,
                const std::vector<std::int64_t>& want) {
    REQUIRE(got.size() == want.size());
    REQUIRE(got.size() == prompts.size() * 77);
    for (std::size_t i = 0; i < prompts.size(); ++i) {
        INFO("prompt " << i << ": '" << prompts[i] << "'");
        CHECK(std::vector<std::int64_t>(got.begin() + static_cast<std::ptrdiff_t>(i * 77),
                                        got.begin() + static_cast<std::ptrdiff_t>((i + 1) * 77)) ==
              std::vector<std::int64_t>(want.begin() + static_cast<std::ptrdiff_t>(i * 77),
                                        want.begin() + static_cast<std::ptrdiff_t>((i + 1) * 77)));
    }
}

}  // namespace

TEST_CASE("clip tokenizer: shipped vocabulary", "[tokenizer]") {
    const auto& tok = sd15();
    CHECK(tok.vocab_size() == 49408);
    CHECK(tok.bos_id() == 49406);
    CHECK(tok.eos_id() == 49407);
    CHECK(tok.pad_id() == 49407);
    CHECK(tok.token_id("cat</w>") == 2368);
    const auto ids = tok.encode("a photo of a cat");
    REQUIRE(ids.size() == 77);
    CHECK(std::vector<std::int64_t>(ids.begin(), ids.begin() + 8) ==
          std::vector<std::int64_t>{49406, 320, 1125, 539, 320, 2368, 49407, 49407});
}

TEST_CASE("clip tokenizer: transformers golden prompts", "[tokenizer][golden]") {
    const auto g = dynamicid::conform::golden_case::open(golden_dir / "prompts.safetensors");
    const auto prompts = g.setting<std::vector<std::string>>("prompts");
    check_rows(prompts, sd15().encode_batch(prompts), golden_ids(g));
}

TEST_CASE("clip tokenizer: ill-formed UTF-8 becomes U+FFFD", "[tokenizer][golden]") {
    const auto g = dynamicid::conform::golden_case::open(golden_dir / "malformed.safetensors");
    std::vector<std::string> prompts;
    for (const auto& hex : g.setting<std::vector<std::string>>("prompts_hex"))
        prompts.push_back(dynamicid::conform::detail::bytes_from_hex(g, hex));
    check_rows(prompts, sd15().encode_batch(prompts), golden_ids(g));

    using dynamicid::text::detail::decode_utf8;
    const std::u32string r(1, U'\uFFFD');
    CHECK(decode_utf8("a\xff" "b") == U"a" + r + U"b");
    CHECK(decode_utf8("\xe2\x82") == r);                 // truncated: one maximal subpart
    CHECK(decode_utf8("\xed\xa0\x80") == r + r + r);     // surrogate: each byte
    CHECK(decode_utf8("\xc0\xaf") == r + r);             // overlong
    CHECK(decode_utf8("\xf0\x9f\x98" "x") == r + U"x");
    CHECK(decode_utf8("\xf0\x9f\x98\x80") == U"\U0001F600");
    CHECK(sd15().encode("caf\xe9") == sd15().encode("caf\xef\xbf\xbd"));
}

TEST_CASE("clip tokenizer: diffusers-style folder", "[tokenizer][golden]") {
    const auto g = dynamicid::conform::golden_case::open(golden_dir / "toy_folder.safetensors");
    const auto prompts = g.setting<std::vector<std::string>>("prompts");
    const auto folder = golden_dir / g.setting<std::string>("tokenizer_folder");
    const auto tok = clip_tokenizer::from_folder(folder);
    CHECK(tok.pad_id() == tok.token_id("!"));  // tokenizer_config.json's pad_token
    check_rows(prompts, tok.encode_batch(prompts), golden_ids(g));

    // The same files through from_files keep "<|endoftext|>" as the pad token.
    const auto plain = clip_tokenizer::from_files(folder / "vocab.json", folder / "merges.txt");
    CHECK(plain.pad_id() == plain.eos_id());
    CHECK(plain.tokenize("a photo") == tok.tokenize("a photo"));
}

TEST_CASE("clip tokenizer: truncation, batches and specials", "[tokenizer]") {
    const auto& tok = sd15();
    std::string long_prompt;
    for (int i = 0; i < 100; ++i) long_prompt += "cat ";
    const auto ids = tok.encode(long_prompt);
    REQUIRE(ids.size() == 77);
    CHECK(ids.front() == 49406);
    CHECK(ids.back() == 49407);
    CHECK(ids[75] == 2368);
    CHECK(tok.encode("", 10) == std::vector<std::int64_t>{49406, 49407, 49407, 49407, 49407, 49407, 49407, 49407, 49407, 49407});
    CHECK(tok.encode_batch({"a", "b", "c"}).size() == 3 * 77);
    CHECK(tok.tokenize("x<|endoftext|>y") == std::vector<std::int64_t>{343, 49407, 344});
    CHECK_THROWS_AS(tok.encode("x", 1), dynamicid::value_error);
}

TEST_CASE("clip tokenizer: missing files give tokenizer-prefixed errors", "[tokenizer]") {
    const auto missing = fs::path(DYNAMICID_TEST_DATA_DIR) / "no-such-dir";
    try {
        (void)clip_tokenizer::load_default(missing);
        FAIL("expected an io_error");
    } catch (const dynamicid::io_error& e) {
        CHECK(std::string(e.what()).rfind("[tokenizer] ", 0) == 0);
        CHECK(std::string(e.what()).find("bpe_simple_vocab_16e6.txt.gz") != std::string::npos);
    }
    CHECK_THROWS_AS(clip_tokenizer::from_merges_gz(missing / "x.gz"), dynamicid::io_error);
    CHECK_THROWS_AS(clip_tokenizer::from_files(missing / "vocab.json", missing / "merges.txt"), dynamicid::io_error);
    CHECK_THROWS_AS(clip_tokenizer::from_merges_text("#version\na b\n"), dynamicid::io_error);
}

#ifdef DYNAMICID_DATA_DIR
TEST_CASE("clip tokenizer: conformance runner", "[tokenizer][conform]") {
    dynamicid::cpu_backend::context ctx;
    const auto registry = dynamicid::conform::registry<dynamicid::cpu_backend>::builtin();
    for (const char* name : {"prompts.safetensors", "malformed.safetensors", "toy_folder.safetensors"}) {
        const auto g = dynamicid::conform::golden_case::open(golden_dir / name);
        for (const auto& r : dynamicid::conform::run_case(ctx, registry, g)) {
            INFO(r.file << ' ' << r.name << " max_abs=" << r.max_abs << ' ' << r.note);
            CHECK(r.pass);
            CHECK(r.max_abs == 0.0);
        }
    }
}
#endif
