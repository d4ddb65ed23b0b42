// dynamicid onednn backend, internal: engine, stream, primitive cache, scratch
// memory and the thread-count scope every oneDNN call runs in.
#pragma once

#include <dynamicid/backends/onednn/detail/host_pool.hpp>
#include <dynamicid/backends/onednn/detail/weight_cache.hpp>
#include <dynamicid/core/dtype.hpp>
#include <dynamicid/core/error.hpp>

#include <oneapi/dnnl/dnnl.hpp>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace dynamicid::onednn::detail {

/// oneDNN's data type for a natively computed element type.
template <class T>
constexpr dnnl::memory::data_type data_type_of() {
    if constexpr (std::is_same_v<T, bfloat16>) return dnnl::memory::data_type::bf16;
    else return dnnl::memory::data_type::f32;
}

/// Runs oneDNN (built on OpenMP, as Debian's libdnnl is) inside the caller's
/// thread count: OpenMP's per-thread "nthreads" setting is what oneDNN reads
/// both when it plans a primitive and when it runs one, so it is set for the
/// scope of the call and restored afterwards (no oversubscription, no effect
/// on the caller's other OpenMP code).
class thread_scope {
public:
    explicit thread_scope(int threads) {
#if defined(_OPENMP)
        saved_ = omp_get_max_threads();
        if (threads != saved_) omp_set_num_threads(threads);
#else
        (void)threads;
#endif
    }
    ~thread_scope() {
#if defined(_OPENMP)
        if (omp_get_max_threads() != saved_) omp_set_num_threads(saved_);
#endif
    }
    thread_scope(const thread_scope&) = delete;
    thread_scope& operator=(const thread_scope&) = delete;

private:
    int saved_ = 1;
};

/// A cache key: the raw bytes of the values that define a primitive.
class key {
public:
    explicit key(const char* op) : bytes_(op) { bytes_.push_back('\0'); }
    template <class V>
        requires std::is_trivially_copyable_v<V>
    key& operator<<(const V& v) {
        const auto* p = reinterpret_cast<const char*>(&v);
        bytes_.append(p, sizeof v);
        return *this;
    }
    const std::string& str() const noexcept { return bytes_; }

private:
    std::string bytes_;
};

/// A primitive descriptor and its primitive, plus any reorders it needs.
template <class PD, class P>
struct planned {
    PD pd;
    P primitive;
};

/// Per-context oneDNN state. Not safe for concurrent calls (nor is the context).
class runtime {
public:
    runtime() : engine_(dnnl::engine::kind::cpu, 0), stream_(engine_) {}
    runtime(const runtime&) = delete;
    runtime& operator=(const runtime&) = delete;

    const dnnl::engine& engine() const noexcept { return engine_; }
    dnnl::stream& stream() noexcept { return stream_; }

    /// The cached entry for `k`, made by `make()` on first use. Returns null
    /// when oneDNN has no implementation for it (remembered too), so that
    /// callers fall back to the reference backend.
    template <class Entry, class Make>
    Entry* lookup(const key& k, Make&& make) {
        if (auto it = cache_.find(k.str()); it != cache_.end()) {
            ++hits_;
            return static_cast<Entry*>(it->second.get());
        }
        ++misses_;
        std::shared_ptr<Entry> entry;
        try {
            entry = std::make_shared<Entry>(make());
        } catch (const dnnl::error&) {
            entry = nullptr;  // unsupported configuration
            ++unsupported_;
        }
        if (cache_.size() >= capacity) cache_.clear();  // simple bound; re-planning is cheap next to a UNet step
        cache_.emplace(k.str(), entry);
        return entry.get();
    }

    /// Reusable 64-byte aligned scratch memory; `slot` keeps simultaneous uses apart.
    void* scratch(std::size_t slot, std::size_t bytes) {
        if (slot >= scratch_.size()) scratch_.resize(slot + 1);
        auto& s = scratch_[slot];
        if (s.bytes < bytes) {
            const std::size_t rounded = (bytes + 4095) / 4096 * 4096;
            void* p = std::aligned_alloc(64, rounded);
            if (!p) throw value_error("onednn", "out of memory allocating " + std::to_string(rounded) + " scratch bytes");
            s.data.reset(p);
            s.bytes = rounded;
        }
        return s.data.get();
    }

    /// The cache of large host allocations, made on first use with `limit`
    /// bytes (a later call with another limit changes it).
    const std::shared_ptr<host_pool>& pool(std::size_t limit) {
        if (!pool_) pool_ = std::make_shared<host_pool>(limit);
        else if (limit != pool_limit_) pool_->set_limit(limit);
        pool_limit_ = limit;
        return pool_;
    }
    /// The runtime of worker thread `i` for work a call splits over threads
    /// itself (its own stream, plans and scratch); made on first use, so
    /// call it before the parallel region.
    const std::shared_ptr<runtime>& worker(int i) {
        const auto u = static_cast<std::size_t>(i);
        if (u >= workers_.size()) workers_.resize(u + 1);
        if (!workers_[u]) workers_[u] = std::make_shared<runtime>();
        return workers_[u];
    }

    /// Convolution weights kept in oneDNN's layouts (used when the context asks for it).
    weight_cache& weights() noexcept { return weights_; }

    /// The pool if one was made, else null.
    host_pool* pool_if_made() const noexcept { return pool_.get(); }

    std::size_t cache_hits() const noexcept { return hits_; }
    std::size_t cache_misses() const noexcept { return misses_; }
    std::size_t cache_size() const noexcept { return cache_.size(); }
    /// Configurations oneDNN could not plan (they ran on the reference code).
    std::size_t unsupported() const noexcept { return unsupported_; }

    static constexpr std::size_t capacity = 4096;

private:
    struct release {
        void operator()(void* p) const noexcept { std::free(p); }
    };
    struct block {
        std::unique_ptr<void, release> data;
        std::size_t bytes = 0;
    };

    dnnl::engine engine_;
    dnnl::stream stream_;
    std::unordered_map<std::string, std::shared_ptr<void>> cache_;
    std::vector<block> scratch_;
    std::shared_ptr<host_pool> pool_;
    std::vector<std::shared_ptr<runtime>> workers_;
    weight_cache weights_;
    std::size_t pool_limit_ = 0;
    std::size_t hits_ = 0, misses_ = 0, unsupported_ = 0;
};

/// A oneDNN memory object over caller-owned data.
inline dnnl::memory wrap(const dnnl::memory::desc& md, const dnnl::engine& eng, const void* data) {
    return dnnl::memory(md, eng, const_cast<void*>(data));
}

/// Plain row-major strides for `dims`.
inline dnnl::memory::dims dense_strides(const dnnl::memory::dims& dims) {
    dnnl::memory::dims s(dims.size());
    dnnl::memory::dim running = 1;
    for (std::size_t i = dims.size(); i-- > 0;) {
        s[i] = running;
        running *= dims[i];
    }
    return s;
}

}  // namespace dynamicid::onednn::detail
