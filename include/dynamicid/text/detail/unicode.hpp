// dynamicid text (internal): the Unicode steps of the CLIP tokenizer's
// normaliser, written against the generated tables in unicode_tables.hpp.
//
//   decode_utf8     UTF-8 -> code points; every ill-formed sequence becomes
//                   U+FFFD, one per maximal ill-formed subpart (the policy of
//                   Unicode chapter 3 and of Python's errors="replace").
//   nfc             canonical decomposition, canonical ordering, canonical
//                   composition (Hangul handled algorithmically).
//   to_lower        full per-character lower-case mapping (no final-sigma rule).
//   is_white_space  the White_Space property (what the reference's `\s` matches).
#pragma once

#include <dynamicid/text/detail/unicode_tables.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <string>
#include <string_view>
#include <utility>

namespace dynamicid::text::detail {

inline constexpr char32_t replacement_character = 0xFFFD;

template <std::size_t N>
constexpr bool in_ranges(const unicode::code_range (&table)[N], char32_t c) {
    const auto* it = std::upper_bound(std::begin(table), std::end(table), c,
                                      [](char32_t v, const unicode::code_range& r) { return v < r.first; });
    return it != std::begin(table) && c <= std::prev(it)->last;
}

inline bool is_letter(char32_t c) { return in_ranges(unicode::letters, c); }
inline bool is_number(char32_t c) { return in_ranges(unicode::numbers, c); }

/// White_Space (Unicode PropList): the class the reference regex engine uses
/// for `\s`. Note U+001C..U+001F are not in it (Python's str.isspace differs).
constexpr bool is_white_space(char32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
           c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/// Decodes UTF-8, replacing each maximal ill-formed subpart with U+FFFD.
inline std::u32string decode_utf8(std::string_view in) {
    std::u32string out;
    out.reserve(in.size());
    std::size_t i = 0;
    const std::size_t n = in.size();
    const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(in[k]); };
    while (i < n) {
        const unsigned b0 = byte(i);
        if (b0 < 0x80) {
            out.push_back(b0);
            ++i;
            continue;
        }
        int need = 0;
        unsigned lo = 0x80, hi = 0xBF;  // allowed range of the second byte
        char32_t cp = 0;
        if (b0 >= 0xC2 && b0 <= 0xDF) {
            need = 1;
            cp = b0 & 0x1F;
        } else if (b0 >= 0xE0 && b0 <= 0xEF) {
            need = 2;
            cp = b0 & 0x0F;
            if (b0 == 0xE0) lo = 0xA0;
            if (b0 == 0xED) hi = 0x9F;  // no surrogates
        } else if (b0 >= 0xF0 && b0 <= 0xF4) {
            need = 3;
            cp = b0 & 0x07;
            if (b0 == 0xF0) lo = 0x90;
            if (b0 == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
        } else {
            out.push_back(replacement_character);
            ++i;
            continue;
        }
        std::size_t k = 1;
        bool ok = true;
        for (; k <= static_cast<std::size_t>(need); ++k) {
            if (i + k >= n) {
                ok = false;
                break;
            }
            const unsigned b = byte(i + k);
            const unsigned l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
            if (b < l || b > h) {
                ok = false;
                break;
            }
            cp = (cp << 6) | (b & 0x3F);
        }
        if (ok) {
            out.push_back(cp);
            i += static_cast<std::size_t>(need) + 1;
        } else {
            out.push_back(replacement_character);
            i += k;  // the lead byte and the valid continuation bytes seen so far
        }
    }
    return out;
}

inline void append_utf8(std::string& out, char32_t c) {
    if (c < 0x80) {
        out.push_back(static_cast<char>(c));
    } else if (c < 0x800) {
        out.push_back(static_cast<char>(0xC0 | (c >> 6)));
        out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else if (c < 0x10000) {
        out.push_back(static_cast<char>(0xE0 | (c >> 12)));
        out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else {
        out.push_back(static_cast<char>(0xF0 | (c >> 18)));
        out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
}

inline std::string encode_utf8(std::u32string_view in) {
    std::string out;
    out.reserve(in.size());
    for (char32_t c : in) append_utf8(out, c);
    return out;
}

// ---- NFC ------------------------------------------------------------------------

namespace hangul {
inline constexpr char32_t s_base = 0xAC00, l_base = 0x1100, v_base = 0x1161, t_base = 0x11A7;
inline constexpr char32_t l_count = 19, v_count = 21, t_count = 28, n_count = v_count * t_count, s_count = l_count * n_count;
}  // namespace hangul

inline std::uint8_t combining_class(char32_t c) {
    const auto& table = unicode::combining;
    const auto* it = std::upper_bound(std::begin(table), std::end(table), c,
                                      [](char32_t v, const unicode::combining_range& r) { return v < r.first; });
    if (it == std::begin(table)) return 0;
    --it;
    return c <= it->last ? it->ccc : 0;
}

inline void decompose_into(std::u32string& out, char32_t c) {
    using namespace hangul;
    if (c >= s_base && c < s_base + s_count) {
        const char32_t s = c - s_base;
        out.push_back(l_base + s / n_count);
        out.push_back(v_base + (s % n_count) / t_count);
        if (s % t_count != 0) out.push_back(t_base + s % t_count);
        return;
    }
    const auto& table = unicode::decompositions;
    const auto* it = std::lower_bound(std::begin(table), std::end(table), c,
                                      [](const unicode::decomposition_entry& e, char32_t v) { return e.code < v; });
    if (it != std::end(table) && it->code == c) {
        out.append(unicode::decomposition_pool + it->offset, it->length);
    } else {
        out.push_back(c);
    }
}

/// The primary composite of (a, b), or 0 when there is none.
inline char32_t compose_pair(char32_t a, char32_t b) {
    using namespace hangul;
    if (a >= l_base && a < l_base + l_count && b >= v_base && b < v_base + v_count)
        return s_base + ((a - l_base) * v_count + (b - v_base)) * t_count;
    if (a >= s_base && a < s_base + s_count && (a - s_base) % t_count == 0 && b > t_base && b < t_base + t_count)
        return a + (b - t_base);
    const auto& table = unicode::compositions;
    const auto* it = std::lower_bound(std::begin(table), std::end(table), std::pair{a, b},
                                      [](const unicode::composition_entry& e, const std::pair<char32_t, char32_t>& v) {
                                          return e.first < v.first || (e.first == v.first && e.second < v.second);
                                      });
    return it != std::end(table) && it->first == a && it->second == b ? it->composite : 0;
}

/// Normalization Form C.
inline std::u32string nfc(std::u32string_view in) {
    // Everything below U+0300 is a starter that is already composed.
    if (std::all_of(in.begin(), in.end(), [](char32_t c) { return c < 0x300; })) return std::u32string(in);

    std::u32string d;
    d.reserve(in.size() + 8);
    for (char32_t c : in) decompose_into(d, c);

    // Canonical ordering: stable sort of each run of non-starters by class.
    for (std::size_t i = 0; i < d.size();) {
        if (combining_class(d[i]) == 0) {
            ++i;
            continue;
        }
        std::size_t j = i;
        while (j < d.size() && combining_class(d[j]) != 0) ++j;
        std::stable_sort(d.begin() + static_cast<std::ptrdiff_t>(i), d.begin() + static_cast<std::ptrdiff_t>(j),
                         [](char32_t a, char32_t b) { return combining_class(a) < combining_class(b); });
        i = j;
    }

    std::u32string out;
    out.reserve(d.size());
    std::ptrdiff_t starter = -1;  // index in `out` of the last starter
    int last_class = -1;          // class of the last character kept after it; -1 when adjacent
    for (char32_t c : d) {
        const int cls = combining_class(c);
        if (starter >= 0 && (last_class == -1 || (last_class != 0 && last_class < cls))) {
            if (const char32_t composite = compose_pair(out[static_cast<std::size_t>(starter)], c)) {
                out[static_cast<std::size_t>(starter)] = composite;
                continue;
            }
        }
        if (cls == 0) {
            starter = static_cast<std::ptrdiff_t>(out.size());
            last_class = -1;
        } else {
            last_class = cls;
        }
        out.push_back(c);
    }
    return out;
}

// ---- lower case -----------------------------------------------------------------

/// Full lower-casing, character by character (one or two code points each).
/// No context rules: capital sigma always becomes small sigma, never final
/// sigma, as in the reference normaliser.
inline std::u32string to_lower(std::u32string_view in) {
    std::u32string out;
    out.reserve(in.size());
    for (std::size_t i = 0; i < in.size(); ++i) {
        const char32_t c = in[i];
        if (c < 0x80) {
            out.push_back(c >= U'A' && c <= U'Z' ? c + 32 : c);
            continue;
        }
        const auto& table = unicode::lower_case;
        const auto* it = std::lower_bound(std::begin(table), std::end(table), c,
                                          [](const unicode::lower_entry& e, char32_t v) { return e.code < v; });
        if (it != std::end(table) && it->code == c) {
            out.push_back(it->lower);
            if (it->lower2 != 0) out.push_back(it->lower2);
        } else {
            out.push_back(c);
        }
    }
    return out;
}

}  // namespace dynamicid::text::detail
