// dynamicid conformance: the CLIPTokenizer handler.
#pragma once

#include <dynamicid/conform/detail/golden_case.hpp>
#include <dynamicid/text/clip_tokenizer.hpp>

#include <filesystem>
#include <string>
#include <vector>

namespace dynamicid::conform::detail {

/// The shipped SD1.5 tokenizer, loaded once (text::clip_tokenizer::load_default).
inline const text::clip_tokenizer& default_clip_tokenizer() {
    static const text::clip_tokenizer tok = text::clip_tokenizer::load_default();
    return tok;
}

inline std::string bytes_from_hex(const golden_case& g, const std::string& hex) {
    check<value_error>(hex.size() % 2 == 0, "conform", g.file_name(), ": odd-length hex prompt");
    std::string out;
    for (std::size_t i = 0; i < hex.size(); i += 2) out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
    return out;
}

/// CLIPTokenizer: config "prompts" (UTF-8 strings) or "prompts_hex" (raw
/// bytes, possibly ill-formed UTF-8), optional "tokenizer_folder" (a
/// vocab.json + merges.txt folder, relative to the case's directory), optional
/// "max_length" (77) -> output.input_ids (N, max_length).
template <class B>
output_map<B> clip_tokenizer_case(context_t<B>& ctx, const golden_case& g) {
    std::vector<std::string> prompts;
    if (g.has_setting("prompts_hex")) {
        for (const auto& h : g.setting<std::vector<std::string>>("prompts_hex")) prompts.push_back(bytes_from_hex(g, h));
    } else {
        prompts = g.setting<std::vector<std::string>>("prompts");
    }
    const auto length = g.setting<std::size_t>("max_length", text::clip_tokenizer::default_context_length);
    std::vector<std::int64_t> ids;
    if (g.has_setting("tokenizer_folder")) {
        const auto folder = std::filesystem::path(g.file_name()).parent_path() / g.setting<std::string>("tokenizer_folder");
        ids = text::clip_tokenizer::from_folder(folder).encode_batch(prompts, length);
    } else {
        ids = default_clip_tokenizer().encode_batch(prompts, length);
    }
    // Ids are below 2^24, so float holds them exactly.
    const std::vector<float> values(ids.begin(), ids.end());
    output_map<B> out;
    out.insert_or_assign("input_ids", any_tensor<B>(tensor<B, float>::from_host(
                                          ctx, shape{static_cast<index_t>(prompts.size()), static_cast<index_t>(length)},
                                          std::span<const float>(values))));
    return out;
}

}  // namespace dynamicid::conform::detail
