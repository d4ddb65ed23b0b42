// dynamicid: the tensor handle used by ops and modules.
//
// A tensor<B, T> is a contiguous row-major view of a reference-counted
// backend buffer: copying a tensor is cheap and shares storage (as torch does),
// reshape and leading-axis slices share it too. Ops never write into their
// inputs, so sharing is safe; weights loaded once can serve many threads.
//
//     dynamicid::cpu::context ctx;
//     auto x = dynamicid::tensor<dynamicid::cpu_backend, float>::zeros(ctx, {2, 3});
//     std::vector<float> host = x.to_host(ctx);
#pragma once

#include <dynamicid/core/backend.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/core/shape.hpp>

#include <memory>
#include <span>
#include <vector>

namespace dynamicid {

template <class B, class T>
    requires backend<B>
class tensor {
public:
    using backend_type = B;
    using value_type = T;
    using context = context_t<B>;

    tensor() = default;

    /// Uninitialised storage of the given shape.
    static tensor empty(context& ctx, const dynamicid::shape& s) {
        tensor t;
        t.storage_ = std::make_shared<buffer_t<B, T>>(B::template allocate<T>(ctx, static_cast<std::size_t>(s.numel())));
        t.shape_ = s;
        return t;
    }

    static tensor full(context& ctx, const dynamicid::shape& s, T value) {
        tensor t = empty(ctx, s);
        B::fill(ctx, t.data(), static_cast<std::size_t>(s.numel()), value);
        return t;
    }

    static tensor zeros(context& ctx, const dynamicid::shape& s) { return full(ctx, s, element_cast<T>(0.0f)); }

    /// Copies `values` (row-major, numel elements) from host memory.
    static tensor from_host(context& ctx, const dynamicid::shape& s, std::span<const T> values) {
        check<shape_error>(static_cast<index_t>(values.size()) == s.numel(), "tensor", "shape ", s.str(), " needs ", s.numel(),
                           " values, got ", values.size());
        tensor t = empty(ctx, s);
        B::copy_from_host(ctx, values.data(), t.data(), values.size());
        return t;
    }

    /// Copies the tensor to host memory; waits for the backend.
    std::vector<T> to_host(context& ctx) const {
        std::vector<T> out(static_cast<std::size_t>(numel()));
        if (!out.empty()) B::copy_to_host(ctx, data(), out.data(), out.size());
        B::synchronize(ctx);
        return out;
    }

    const dynamicid::shape& shape() const noexcept { return shape_; }
    index_t numel() const noexcept { return shape_.numel(); }
    int rank() const noexcept { return shape_.rank(); }
    index_t dim(int axis) const { return shape_[axis]; }
    bool defined() const noexcept { return storage_ != nullptr; }

    pointer_t<B, T> data() const {
        check<value_error>(defined(), "tensor", "use of an undefined tensor");
        return storage_->data() + static_cast<std::ptrdiff_t>(offset_);
    }

    /// Same storage, new shape with the same number of elements. One
    /// dimension may be -1 and is inferred.
    tensor reshape(std::vector<index_t> dims) const {
        index_t known = 1;
        int infer = -1;
        for (std::size_t i = 0; i < dims.size(); ++i) {
            if (dims[i] == -1) {
                check<shape_error>(infer < 0, "tensor", "reshape with more than one -1");
                infer = static_cast<int>(i);
            } else {
                known *= dims[i];
            }
        }
        if (infer >= 0) {
            check<shape_error>(known > 0 && numel() % known == 0, "tensor", "cannot reshape ", shape_.str(), " with -1");
            dims[static_cast<std::size_t>(infer)] = numel() / known;
        }
        dynamicid::shape s(dims);
        check<shape_error>(s.numel() == numel(), "tensor", "cannot reshape ", shape_.str(), " to ", s.str());
        tensor t = *this;
        t.shape_ = s;
        return t;
    }

    /// Rows [start, start + count) of the leading axis, sharing storage.
    tensor narrow_leading(index_t start, index_t count) const {
        check<shape_error>(rank() >= 1 && start >= 0 && count >= 0 && start + count <= shape_[0], "tensor", "leading slice [",
                           start, ", ", start + count, ") out of range for ", shape_.str());
        tensor t = *this;
        t.shape_[0] = count;
        t.offset_ += start * (shape_[0] ? numel() / shape_[0] : 0);
        return t;
    }

    /// True when both share the same storage.
    bool shares_storage_with(const tensor& other) const noexcept { return storage_ == other.storage_; }

private:
    std::shared_ptr<buffer_t<B, T>> storage_;
    dynamicid::shape shape_;
    index_t offset_ = 0;
};

}  // namespace dynamicid
