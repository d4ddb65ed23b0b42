// dynamicid text: the CLIP BPE tokenizer of Stable Diffusion's text encoder.
//
// Produces the same ids as transformers' CLIPTokenizer (5.x, the
// tokenizers-backed class; its slow predecessor and CLIPTokenizerFast agree
// with it on ordinary prompts) for SD1.5's vocabulary:
//
//   1. the literal strings "<|startoftext|>" / "<|endoftext|>" (and the pad
//      token's text when it is another string) are special tokens wherever
//      they occur in the raw prompt (case-sensitive);
//   2. every other stretch of text is normalised: NFC, each run of White_Space
//      becomes one space, full Unicode lower-casing of each character alone
//      (so no final sigma: "ΟΔΟΣ" -> "οδοσ"). No
//      ftfy repair happens (transformers 5 has none);
//   3. it is split into words by
//        <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
//      (white space is dropped), then each word again by the byte-level
//      (GPT-2) pattern, which only splits the lower-cased "<|...|>" strings;
//   4. each word's UTF-8 bytes are mapped to printable characters (GPT-2's
//      bytes_to_unicode), "</w>" marks the last one, and BPE merges are applied
//      lowest rank first;
//   5. ids = [BOS 49406] + the first 75 word-piece ids + [EOS 49407], padded
//      with the pad id (EOS for SD1.5) to 77.
//
// Input is UTF-8; bytes that are not well-formed UTF-8 never throw: each
// maximal ill-formed subpart becomes U+FFFD (as Python's
// bytes.decode("utf-8", errors="replace") does) before step 1.
// Unicode properties come from generated tables (Unicode 14, Python 3.11's
// unicodedata); the reference's regex engine may know newer characters.
//
//     auto tok = dynamicid::text::clip_tokenizer::load_default();   // shipped SD1.5 vocabulary
//     std::vector<std::int64_t> ids = tok.encode("a photo of a cat");  // 77 ids
//     auto batch = tok.encode_batch({"a dog", "a cat"});             // 2 x 77, row-major
//
//     // a diffusers checkout's tokenizer/ folder
//     auto tok2 = dynamicid::text::clip_tokenizer::from_folder("sd15/tokenizer");
//
// Reading the gzip'd merges file needs zlib (link ZLIB::ZLIB).
#pragma once

// range-v3 is host-only here: nvcc's front end cannot parse it, and the tokenizer never runs on a device.
#include <range/v3/algorithm/min_element.hpp>
#include <range/v3/iterator/operations.hpp>
#include <range/v3/view/drop.hpp>
#include <range/v3/view/transform.hpp>
#include <range/v3/view/zip.hpp>

#include <dynamicid/core/error.hpp>
#include <dynamicid/text/detail/unicode.hpp>

#include <nlohmann/json.hpp>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace dynamicid::text {

/// CLIP's byte-level BPE tokenizer (see the file comment for the exact rules).
///
///     auto tok = clip_tokenizer::from_merges_gz("data/clip/bpe_simple_vocab_16e6.txt.gz");
///     auto ids = tok.encode("a portrait of a woman, smiling");  // 77 ids, BOS ... EOS EOS ...
class clip_tokenizer {
public:
    static constexpr std::size_t default_context_length = 77;
    static constexpr std::string_view start_token = "<|startoftext|>";
    static constexpr std::string_view end_token = "<|endoftext|>";
    static constexpr std::string_view default_merges_file = "bpe_simple_vocab_16e6.txt.gz";

    /// Builds the tokenizer from the text of CLIP's merges file (the
    /// decompressed bpe_simple_vocab_16e6.txt): the first line is a header, the
    /// next 48894 lines are merges. The vocabulary is built as CLIP builds it:
    /// the 256 byte characters, the same with "</w>", each merge joined, then
    /// <|startoftext|> and <|endoftext|> (49408 entries).
    static clip_tokenizer from_merges_text(std::string_view text) {
        constexpr std::size_t merge_count = 49152 - 256 - 2;
        const auto lines = split_lines(text);
        check<io_error>(lines.size() > merge_count, "tokenizer", "merges file has ", lines.size(), " lines, expected at least ",
                        merge_count + 1);
        clip_tokenizer t;
        const auto& chars = byte_characters();
        std::vector<std::string> vocab;
        vocab.reserve(2 * 256 + merge_count + 2);
        for (int b : byte_order()) vocab.push_back(chars[static_cast<std::size_t>(b)]);
        for (int b : byte_order()) vocab.push_back(chars[static_cast<std::size_t>(b)] + "</w>");
        for (std::size_t i = 1; i <= merge_count; ++i) {
            const auto [a, b] = parse_merge(lines[i], i + 1);
            t.ranks_.emplace(merge_key(a, b), static_cast<int>(i - 1));
            vocab.push_back(std::string(a) + std::string(b));
        }
        vocab.emplace_back(start_token);
        vocab.emplace_back(end_token);
        for (std::size_t i = 0; i < vocab.size(); ++i) t.vocab_.emplace(std::move(vocab[i]), static_cast<std::int64_t>(i));
        t.finish_specials(end_token);
        return t;
    }

    /// Reads CLIP's gzip'd merges file (bpe_simple_vocab_16e6.txt.gz).
    static clip_tokenizer from_merges_gz(const std::filesystem::path& path) {
        return from_merges_text(read_gzip(path));
    }

    /// A Hugging Face tokenizer: vocab.json (token -> id) and merges.txt (an
    /// optional "#version" line, then one "a b" merge per line, rank = order).
    /// `pad_token` names the padding token (diffusers' SD1.5 folder: "<|endoftext|>").
    static clip_tokenizer from_files(const std::filesystem::path& vocab_json, const std::filesystem::path& merges_txt,
                                     std::string_view pad_token = end_token) {
        clip_tokenizer t;
        nlohmann::json vocab;
        try {
            vocab = nlohmann::json::parse(read_file(vocab_json));
        } catch (const nlohmann::json::exception& e) {
            throw io_error("tokenizer", vocab_json.string() + ": not valid JSON: " + e.what());
        }
        check<io_error>(vocab.is_object(), "tokenizer", vocab_json.string(), ": expected a JSON object of token -> id");
        for (const auto& [token, id] : vocab.items()) {
            check<io_error>(id.is_number_integer(), "tokenizer", vocab_json.string(), ": id of '", token, "' is not an integer");
            t.vocab_.emplace(token, id.get<std::int64_t>());
        }
        const std::string merges_text = read_file(merges_txt);
        const auto lines = split_lines(merges_text);
        int rank = 0;
        for (std::size_t i = 0; i < lines.size(); ++i) {
            const std::string_view line = lines[i];
            if (line.empty() || (i == 0 && line.rfind("#version", 0) == 0)) continue;
            const auto [a, b] = parse_merge(line, i + 1);
            t.ranks_.emplace(merge_key(a, b), rank++);
        }
        t.finish_specials(pad_token);
        return t;
    }

    /// A diffusers / transformers tokenizer folder: vocab.json and merges.txt;
    /// the pad token is read from special_tokens_map.json or
    /// tokenizer_config.json when present (else "<|endoftext|>").
    static clip_tokenizer from_folder(const std::filesystem::path& folder) {
        std::string pad(end_token);
        for (const char* name : {"special_tokens_map.json", "tokenizer_config.json"}) {
            const auto p = folder / name;
            if (!std::filesystem::exists(p)) continue;
            try {
                const auto j = nlohmann::json::parse(read_file(p));
                if (j.contains("pad_token")) {
                    const auto& v = j["pad_token"];
                    if (v.is_string()) pad = v.get<std::string>();
                    else if (v.is_object() && v.contains("content") && v["content"].is_string()) pad = v["content"].get<std::string>();
                    break;
                }
            } catch (const nlohmann::json::exception& e) {
                throw io_error("tokenizer", p.string() + ": not valid JSON: " + e.what());
            }
        }
        return from_files(folder / "vocab.json", folder / "merges.txt", pad);
    }

    /// Where load_default() looks: `data_dir` if given, else the environment
    /// variable DYNAMICID_DATA_DIR, else the directory compiled in as
    /// DYNAMICID_DATA_DIR (the source tree's data/, or the installed
    /// share/dynamicid); the file is <dir>/clip/bpe_simple_vocab_16e6.txt.gz.
    static std::filesystem::path default_merges_path(const std::optional<std::filesystem::path>& data_dir = std::nullopt) {
        std::filesystem::path dir;
        if (data_dir) {
            dir = *data_dir;
        } else if (const char* env = std::getenv("DYNAMICID_DATA_DIR"); env != nullptr && *env != '\0') {
            dir = env;
        } else {
#ifdef DYNAMICID_DATA_DIR
            dir = DYNAMICID_DATA_DIR;
#else
            throw io_error("tokenizer",
                           "no data directory: pass one to load_default(), set the DYNAMICID_DATA_DIR environment variable, "
                           "or compile with DYNAMICID_DATA_DIR defined");
#endif
        }
        return dir / "clip" / std::string(default_merges_file);
    }

    /// The SD1.5 vocabulary shipped with the library (see default_merges_path).
    static clip_tokenizer load_default(const std::optional<std::filesystem::path>& data_dir = std::nullopt) {
        const auto path = default_merges_path(data_dir);
        check<io_error>(std::filesystem::exists(path), "tokenizer", "vocabulary file ", path.string(),
                        " not found (pass the data directory to load_default() or set DYNAMICID_DATA_DIR)");
        return from_merges_gz(path);
    }

    std::int64_t bos_id() const noexcept { return bos_; }
    std::int64_t eos_id() const noexcept { return eos_; }
    std::int64_t pad_id() const noexcept { return pad_; }
    std::size_t vocab_size() const noexcept { return vocab_.size(); }

    /// The id of `token` (a vocabulary string such as "cat</w>"), if present.
    std::optional<std::int64_t> token_id(const std::string& token) const {
        const auto it = vocab_.find(token);
        return it == vocab_.end() ? std::nullopt : std::optional<std::int64_t>(it->second);
    }

    /// The word-piece ids of `prompt`, without BOS/EOS, padding or truncation.
    std::vector<std::int64_t> tokenize(std::string_view prompt) const {
        std::vector<std::int64_t> ids;
        const std::u32string text = detail::decode_utf8(prompt);
        std::size_t pos = 0;
        while (pos <= text.size()) {
            // Special-token strings in the raw text: leftmost first, then longest.
            std::size_t next = std::u32string::npos, len = 0;
            std::int64_t special = 0;
            for (const auto& [str, id] : specials_) {
                const std::size_t at = text.find(str, pos);
                if (at < next || (at == next && at != std::u32string::npos && str.size() > len)) {
                    next = at;
                    len = str.size();
                    special = id;
                }
            }
            const std::size_t end = next == std::u32string::npos ? text.size() : next;
            if (end > pos) encode_segment(std::u32string_view(text).substr(pos, end - pos), ids);
            if (next == std::u32string::npos) break;
            ids.push_back(special);
            pos = next + len;
        }
        return ids;
    }

    /// `context_length` ids: BOS, the first context_length - 2 word pieces,
    /// EOS, then the pad id.
    std::vector<std::int64_t> encode(std::string_view prompt, std::size_t context_length = default_context_length) const {
        check<value_error>(context_length >= 2, "tokenizer", "context length must be at least 2, got ", context_length);
        const auto pieces = tokenize(prompt);
        std::vector<std::int64_t> ids;
        ids.reserve(context_length);
        ids.push_back(bos_);
        const std::size_t keep = std::min(pieces.size(), context_length - 2);
        ids.insert(ids.end(), pieces.begin(), pieces.begin() + static_cast<std::ptrdiff_t>(keep));
        ids.push_back(eos_);
        ids.resize(context_length, pad_);
        return ids;
    }

    /// encode() for each prompt, concatenated row-major: prompts.size() x context_length.
    std::vector<std::int64_t> encode_batch(const std::vector<std::string>& prompts,
                                           std::size_t context_length = default_context_length) const {
        std::vector<std::int64_t> out;
        out.reserve(prompts.size() * context_length);
        for (const auto& p : prompts) {
            const auto row = encode(p, context_length);
            out.insert(out.end(), row.begin(), row.end());
        }
        return out;
    }

private:
    std::unordered_map<std::string, std::int64_t> vocab_;
    std::unordered_map<std::string, int> ranks_;
    std::int64_t bos_ = 0, eos_ = 0, pad_ = 0;
    std::vector<std::pair<std::u32string, std::int64_t>> specials_;

    clip_tokenizer() = default;

    void finish_specials(std::string_view pad_token) {
        const auto need = [&](std::string_view token) {
            const auto it = vocab_.find(std::string(token));
            check<io_error>(it != vocab_.end(), "tokenizer", "vocabulary has no '", token, "' token");
            return it->second;
        };
        bos_ = need(start_token);
        eos_ = need(end_token);
        pad_ = need(pad_token);
        // The reference treats every special token's text as that token
        // wherever it appears in a prompt, the pad token included (a "!" pad
        // token, as in SD2's tokenizer, turns each "!" into the pad id).
        specials_ = {{detail::decode_utf8(start_token), bos_}, {detail::decode_utf8(end_token), eos_}};
        if (pad_token != start_token && pad_token != end_token) specials_.emplace_back(detail::decode_utf8(pad_token), pad_);
    }

    static const std::u32string& start_token32() {
        static const std::u32string s = detail::decode_utf8(start_token);
        return s;
    }
    static const std::u32string& end_token32() {
        static const std::u32string s = detail::decode_utf8(end_token);
        return s;
    }

    // GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves, the
    // others to U+0100 onwards, so every byte is a visible character.
    static const std::vector<int>& byte_order() {
        static const std::vector<int> order = [] {
            std::vector<int> bs;
            for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
            for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
            for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
            std::vector<bool> seen(256, false);
            for (int b : bs) seen[static_cast<std::size_t>(b)] = true;
            for (int b = 0; b < 256; ++b)
                if (!seen[static_cast<std::size_t>(b)]) bs.push_back(b);
            return bs;
        }();
        return order;
    }

    static const std::array<std::string, 256>& byte_characters() {
        static const std::array<std::string, 256> table = [] {
            std::array<std::string, 256> t;
            int extra = 0;
            for (int b : byte_order()) {
                const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
                std::string s;
                detail::append_utf8(s, static_cast<char32_t>(printable ? b : 256 + extra++));
                t[static_cast<std::size_t>(b)] = std::move(s);
            }
            return t;
        }();
        return table;
    }

    static std::string merge_key(std::string_view a, std::string_view b) {
        std::string k;
        k.reserve(a.size() + b.size() + 1);
        k.append(a).push_back(' ');
        k.append(b);
        return k;
    }

    static std::pair<std::string_view, std::string_view> parse_merge(std::string_view line, std::size_t line_number) {
        const auto blank = [](char c) { return c == ' ' || c == '\t' || c == '\r'; };
        std::size_t i = 0;
        while (i < line.size() && blank(line[i])) ++i;
        std::size_t j = i;
        while (j < line.size() && !blank(line[j])) ++j;
        std::size_t k = j;
        while (k < line.size() && blank(line[k])) ++k;
        std::size_t l = k;
        while (l < line.size() && !blank(line[l])) ++l;
        std::size_t m = l;
        while (m < line.size() && blank(line[m])) ++m;
        check<io_error>(j > i && l > k && m == line.size(), "tokenizer", "merges line ", line_number, " is not 'a b': '", line, "'");
        return {line.substr(i, j - i), line.substr(k, l - k)};
    }

    static std::vector<std::string_view> split_lines(std::string_view text) {
        std::vector<std::string_view> lines;
        std::size_t start = 0;
        while (start <= text.size()) {
            const std::size_t nl = text.find('\n', start);
            if (nl == std::string_view::npos) {
                lines.push_back(text.substr(start));
                break;
            }
            lines.push_back(text.substr(start, nl - start));
            start = nl + 1;
        }
        return lines;
    }

    static std::string read_file(const std::filesystem::path& path) {
        std::ifstream in(path, std::ios::binary);
        check<io_error>(static_cast<bool>(in), "tokenizer", "cannot open ", path.string());
        std::ostringstream s;
        s << in.rdbuf();
        check<io_error>(!in.bad(), "tokenizer", "cannot read ", path.string());
        return s.str();
    }

    static std::string read_gzip(const std::filesystem::path& path) {
        check<io_error>(std::filesystem::exists(path), "tokenizer", "cannot open ", path.string(), ": no such file");
        gzFile f = gzopen(path.string().c_str(), "rb");
        check<io_error>(f != nullptr, "tokenizer", "cannot open ", path.string());
        std::string out;
        std::array<char, 1 << 16> chunk{};
        for (;;) {
            const int n = gzread(f, chunk.data(), static_cast<unsigned>(chunk.size()));
            if (n < 0) {
                int code = 0;
                const std::string message = gzerror(f, &code);
                gzclose(f);
                throw io_error("tokenizer", path.string() + ": gzip error: " + message);
            }
            if (n == 0) break;
            out.append(chunk.data(), static_cast<std::size_t>(n));
        }
        gzclose(f);
        return out;
    }

    enum class piece_kind { other, letters, number };

    // One split pass. `clip` selects the CLIP pattern (special strings kept
    // whole, single digits); otherwise the byte-level GPT-2 pattern (digit runs).
    // Both drop white space and keep everything they match.
    static std::vector<std::u32string_view> split_words(std::u32string_view s, bool clip) {
        static constexpr std::u32string_view contractions[] = {U"'s", U"'t", U"'re", U"'ve", U"'m", U"'ll", U"'d"};
        std::vector<std::u32string_view> out;
        std::size_t i = 0;
        const auto other = [](char32_t c) {
            return !detail::is_white_space(c) && !detail::is_letter(c) && !detail::is_number(c);
        };
        while (i < s.size()) {
            const std::u32string_view rest = s.substr(i);
            std::size_t len = 0;
            if (clip) {
                for (const auto& special : {start_token32(), end_token32()})
                    if (len == 0 && rest.substr(0, special.size()) == special) len = special.size();
            }
            if (len == 0) {
                for (const auto c : contractions)
                    if (rest.substr(0, c.size()) == c) {
                        len = c.size();
                        break;
                    }
            }
            if (len == 0) {
                const char32_t c = s[i];
                std::size_t j = i;
                if (detail::is_letter(c)) {
                    while (j < s.size() && detail::is_letter(s[j])) ++j;
                } else if (detail::is_number(c)) {
                    ++j;
                    if (!clip)
                        while (j < s.size() && detail::is_number(s[j])) ++j;
                } else if (other(c)) {
                    while (j < s.size() && other(s[j])) ++j;
                } else {
                    ++i;  // white space separates words and is dropped
                    continue;
                }
                len = j - i;
            }
            out.push_back(s.substr(i, len));
            i += len;
        }
        return out;
    }

    void encode_segment(std::u32string_view raw, std::vector<std::int64_t>& ids) const {
        std::u32string text = detail::nfc(raw);
        std::u32string collapsed;
        collapsed.reserve(text.size());
        for (std::size_t i = 0; i < text.size();) {
            if (detail::is_white_space(text[i])) {
                collapsed.push_back(U' ');
                while (i < text.size() && detail::is_white_space(text[i])) ++i;
            } else {
                collapsed.push_back(text[i++]);
            }
        }
        const std::u32string lower = detail::to_lower(collapsed);
        for (const auto word : split_words(lower, true))
            for (const auto piece : split_words(word, false)) bpe(detail::encode_utf8(piece), ids);
    }

    void bpe(const std::string& word_bytes, std::vector<std::int64_t>& ids) const {
        const auto& chars = byte_characters();
        std::vector<std::string> symbols;
        symbols.reserve(word_bytes.size());
        for (const char c : word_bytes) symbols.push_back(chars[static_cast<unsigned char>(c)]);
        if (symbols.empty()) return;
        symbols.back() += "</w>";
        while (symbols.size() > 1) {
            // Rank every adjacent pair; the lowest-ranked (first on ties) merges next.
            const auto pair_rank = [this](const auto& pair) {
                const auto it = ranks_.find(merge_key(std::get<0>(pair), std::get<1>(pair)));
                return it != ranks_.end() ? it->second : std::numeric_limits<int>::max();
            };
            const auto ranked = ranges::views::zip(symbols, symbols | ranges::views::drop(1)) | ranges::views::transform(pair_rank);
            const auto lowest = ranges::min_element(ranked);
            if (*lowest == std::numeric_limits<int>::max()) break;
            const auto at = static_cast<std::size_t>(ranges::distance(ranges::begin(ranked), lowest));
            // Merge every occurrence of the best pair, left to right.
            const std::string first = symbols[at], second = symbols[at + 1];
            std::vector<std::string> merged;
            merged.reserve(symbols.size());
            for (std::size_t i = 0; i < symbols.size();) {
                if (i + 1 < symbols.size() && symbols[i] == first && symbols[i + 1] == second) {
                    merged.push_back(first + second);
                    i += 2;
                } else {
                    merged.push_back(std::move(symbols[i]));
                    ++i;
                }
            }
            symbols = std::move(merged);
        }
        for (const auto& s : symbols) {
            const auto it = vocab_.find(s);
            // Every byte character is in CLIP's vocabulary; a foreign vocabulary
            // without one gets the unknown token (<|endoftext|>), as the reference does.
            ids.push_back(it != vocab_.end() ? it->second : eos_);
        }
    }
};

}  // namespace dynamicid::text
