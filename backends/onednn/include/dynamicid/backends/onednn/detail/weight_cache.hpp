// dynamicid onednn backend, internal: convolution weights kept in oneDNN's
// blocked layout across calls (opt-in: context::weight_cache_bytes).
//
// A convolution otherwise reorders its weights from (C_out, C_in, kh, kw)
// into the layout its kernel wants on every call: 4-5% of an SD1.5 UNet
// evaluation on 2 cores. A backend sees only a pointer, so an entry is keyed
// by the weights' address and the convolution's plan key, and checked on every
// use against a fingerprint of the weights (their count and 16 values spread
// over them, bit for bit): another model loaded at a freed address, or an
// optimiser step that rewrote the weights, reads as a miss and is reordered
// afresh. Writes in place that leave all 16 sampled values unchanged are not
// seen, which is why the cache is off unless asked for. Least recently used
// entries go first when the byte limit is reached.
#pragma once

#include <dynamicid/core/config.hpp>
#include <dynamicid/core/error.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <utility>

namespace dynamicid::onednn::detail {

class weight_cache {
public:
    static constexpr int samples = 16;
    using fingerprint = std::array<std::uint32_t, samples + 1>;

    /// Bits of `n` elements of `elem_bytes` each at `data`: the count and 16 spread values.
    static fingerprint fingerprint_of(const void* data, std::size_t n, std::size_t elem_bytes) {
        fingerprint f{};
        f[samples] = static_cast<std::uint32_t>(n);
        if (n == 0) return f;
        const auto* bytes = static_cast<const unsigned char*>(data);
        for (int i = 0; i < samples; ++i) {
            const std::size_t at = (n - 1) * static_cast<std::size_t>(i) / (samples - 1);
            std::uint32_t v = 0;
            std::memcpy(&v, bytes + at * elem_bytes, std::min<std::size_t>(elem_bytes, sizeof v));
            f[static_cast<std::size_t>(i)] = v;
        }
        return f;
    }

    /// The cached copy for (weights, plan) if its fingerprint still matches, else null.
    void* find(const void* weights, const std::string& plan, const fingerprint& f) {
        const auto it = items_.find({weights, plan});
        if (it == items_.end()) {
            ++misses_;
            return nullptr;
        }
        if (it->second.print != f) {  // rewritten, or another tensor at a reused address
            bytes_ -= it->second.bytes;
            items_.erase(it);
            ++stale_;
            return nullptr;
        }
        it->second.last_use = ++clock_;
        ++hits_;
        return it->second.data.get();
    }

    /// Room for a new copy of `bytes` for (weights, plan), made by evicting the
    /// least recently used entries; null when it cannot fit under `limit`.
    void* insert(const void* weights, const std::string& plan, const fingerprint& f, std::size_t bytes, std::size_t limit) {
        if (bytes > limit) return nullptr;
        while (bytes_ + bytes > limit && !items_.empty()) {
            auto oldest = items_.begin();
            for (auto it = items_.begin(); it != items_.end(); ++it)
                if (it->second.last_use < oldest->second.last_use) oldest = it;
            bytes_ -= oldest->second.bytes;
            items_.erase(oldest);
        }
        const std::size_t rounded = (bytes + 63) / 64 * 64;
        void* p = std::aligned_alloc(64, rounded);
        if (!p) return nullptr;  // no room: the caller reorders into scratch as without a cache
        item& slot = items_[{weights, plan}];
        slot.data.reset(p);
        slot.bytes = bytes;
        slot.print = f;
        slot.last_use = ++clock_;
        bytes_ += bytes;
        return p;
    }

    void clear() noexcept {
        items_.clear();
        bytes_ = 0;
    }
    std::size_t bytes() const noexcept { return bytes_; }
    std::size_t entries() const noexcept { return items_.size(); }
    std::size_t hits() const noexcept { return hits_; }
    std::size_t misses() const noexcept { return misses_; }
    /// Entries found rewritten (fingerprint changed) and dropped.
    std::size_t stale() const noexcept { return stale_; }

private:
    struct release {
        void operator()(void* p) const noexcept { std::free(p); }
    };
    struct item {
        std::unique_ptr<void, release> data;
        std::size_t bytes = 0;
        fingerprint print{};
        std::uint64_t last_use = 0;
    };
    std::map<std::pair<const void*, std::string>, item> items_;
    std::size_t bytes_ = 0;
    std::uint64_t clock_ = 0;
    std::size_t hits_ = 0, misses_ = 0, stale_ = 0;
};

}  // namespace dynamicid::onednn::detail
