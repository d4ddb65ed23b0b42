// dynamicid onednn backend, internal: a cache of large host allocations.
//
// A denoising step allocates and frees the same large activations again and
// again. Above glibc's mmap threshold (32 MiB at most) every such allocation
// is a fresh mapping whose pages the kernel faults in and zeroes on first
// touch: a tenth of a 512 x 512 VAE decode went to that. The pool keeps freed
// blocks of at least `min_bytes` (up to `limit` bytes in all) and hands them
// out again for requests of the same size or a little smaller. Blocks are
// returned from any thread (the pool has its own lock); the pool lives as long
// as its last block.
#pragma once

#include <dynamicid/core/error.hpp>

#include <cstddef>
#include <cstdlib>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>

namespace dynamicid::onednn::detail {

class host_pool {
public:
    static constexpr std::size_t min_bytes = std::size_t{1} << 20;  ///< smaller requests go straight to the allocator

    explicit host_pool(std::size_t limit) : limit_(limit) {}
    host_pool(const host_pool&) = delete;
    host_pool& operator=(const host_pool&) = delete;
    ~host_pool() {
        for (auto& [bytes, p] : free_) std::free(p);
    }

    /// Rounds a request the way the pool stores it (64-byte multiples; 4 KiB above min_bytes).
    static std::size_t rounded(std::size_t bytes) noexcept {
        return bytes >= min_bytes ? (bytes + 4095) / 4096 * 4096 : (bytes + 63) / 64 * 64;
    }

    /// A 64-byte aligned block of at least `bytes` (already rounded); `bytes`
    /// becomes the block's real size, to be passed back to give().
    void* take(std::size_t& bytes) {
        if (bytes >= min_bytes) {
            std::lock_guard lock(mutex_);
            const auto it = free_.lower_bound(bytes);
            if (it != free_.end() && it->first <= bytes + bytes / 4) {  // waste at most a quarter
                void* p = it->second;
                bytes = it->first;
                cached_ -= it->first;
                free_.erase(it);
                ++hits_;
                return p;
            }
            ++misses_;
        }
        void* p = std::aligned_alloc(64, bytes);
        if (!p) throw value_error("onednn", "out of memory allocating " + std::to_string(bytes) + " bytes");
        return p;
    }

    /// Takes a block back (kept when it is large and fits under the limit).
    void give(void* p, std::size_t bytes) noexcept {
        if (bytes >= min_bytes) {
            std::lock_guard lock(mutex_);
            if (cached_ + bytes <= limit_) {
                try {
                    free_.emplace(bytes, p);
                    cached_ += bytes;
                    return;
                } catch (...) {  // no memory for the map node: free the block instead
                }
            }
        }
        std::free(p);
    }

    /// Frees every cached block.
    void trim() noexcept {
        std::lock_guard lock(mutex_);
        for (auto& [bytes, p] : free_) std::free(p);
        free_.clear();
        cached_ = 0;
    }

    void set_limit(std::size_t limit) noexcept {
        std::lock_guard lock(mutex_);
        limit_ = limit;
        while (cached_ > limit_ && !free_.empty()) {  // largest first
            const auto last = std::prev(free_.end());
            std::free(last->second);
            cached_ -= last->first;
            free_.erase(last);
        }
    }

    std::size_t cached_bytes() const {
        std::lock_guard lock(mutex_);
        return cached_;
    }
    std::size_t hits() const {
        std::lock_guard lock(mutex_);
        return hits_;
    }
    std::size_t misses() const {
        std::lock_guard lock(mutex_);
        return misses_;
    }

private:
    mutable std::mutex mutex_;
    std::multimap<std::size_t, void*> free_;
    std::size_t cached_ = 0, limit_;
    std::size_t hits_ = 0, misses_ = 0;
};

/// The oneDNN backend's owning allocation of T: plain 64-byte aligned host
/// memory, from and back to a host_pool when it has one.
template <class T>
class pooled_buffer {
public:
    pooled_buffer() = default;
    pooled_buffer(std::size_t n, std::shared_ptr<host_pool> pool) : size_(n) {
        if (n == 0) return;
        if (n > std::numeric_limits<std::size_t>::max() / sizeof(T) / 2)
            throw value_error("onednn", "allocation of " + std::to_string(n) + " elements is too large");
        std::size_t bytes = host_pool::rounded(n * sizeof(T));
        void* p = pool ? pool->take(bytes) : std::aligned_alloc(64, bytes);
        if (!p) throw value_error("onednn", "out of memory allocating " + std::to_string(bytes) + " bytes");
        data_ = std::unique_ptr<T, release>(static_cast<T*>(p), release{std::move(pool), bytes});
    }
    T* data() const noexcept { return data_.get(); }
    std::size_t size() const noexcept { return size_; }

private:
    struct release {
        std::shared_ptr<host_pool> pool;
        std::size_t bytes = 0;
        void operator()(T* p) const noexcept {
            if (pool) pool->give(p, bytes);
            else std::free(p);
        }
    };
    std::unique_ptr<T, release> data_;
    std::size_t size_ = 0;
};

}  // namespace dynamicid::onednn::detail
