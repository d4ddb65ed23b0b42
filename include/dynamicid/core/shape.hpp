// dynamicid: tensor shapes and broadcasting rules.
#pragma once

#include <dynamicid/core/config.hpp>
#include <dynamicid/core/error.hpp>

#include <algorithm>
#include <array>
#include <initializer_list>
#include <sstream>
#include <string>
#include <vector>

namespace dynamicid {

/// A row-major tensor shape of at most max_rank dimensions.
///
///     dynamicid::shape s{2, 4, 64, 64};  // s.numel() == 32768, s[1] == 4
class shape {
public:
    shape() = default;
    shape(std::initializer_list<index_t> dims) { assign(dims.begin(), dims.end()); }
    explicit shape(const std::vector<index_t>& dims) { assign(dims.begin(), dims.end()); }

    int rank() const noexcept { return rank_; }
    index_t operator[](int axis) const { return dims_[static_cast<std::size_t>(normalise(axis))]; }
    index_t& operator[](int axis) { return dims_[static_cast<std::size_t>(normalise(axis))]; }
    const index_t* begin() const noexcept { return dims_.data(); }
    const index_t* end() const noexcept { return dims_.data() + rank_; }

    index_t numel() const noexcept {
        index_t n = 1;
        for (int i = 0; i < rank_; ++i) n *= dims_[static_cast<std::size_t>(i)];
        return n;
    }

    /// Row-major strides in elements.
    std::array<index_t, max_rank> strides() const noexcept {
        std::array<index_t, max_rank> s{};
        index_t running = 1;
        for (int i = rank_ - 1; i >= 0; --i) {
            s[static_cast<std::size_t>(i)] = running;
            running *= dims_[static_cast<std::size_t>(i)];
        }
        return s;
    }

    /// Negative axes count from the end, as in numpy.
    int normalise(int axis) const {
        const int a = axis < 0 ? axis + rank_ : axis;
        check<shape_error>(a >= 0 && a < rank_, "shape", "axis ", axis, " out of range for ", str());
        return a;
    }

    std::vector<index_t> to_vector() const { return {begin(), end()}; }

    std::string str() const {
        std::ostringstream out;
        out << '(';
        for (int i = 0; i < rank_; ++i) out << (i ? ", " : "") << dims_[static_cast<std::size_t>(i)];
        out << ')';
        return out.str();
    }

    friend bool operator==(const shape& a, const shape& b) {
        return a.rank_ == b.rank_ && std::equal(a.begin(), a.end(), b.begin());
    }

private:
    template <class It>
    void assign(It first, It last) {
        const auto n = std::distance(first, last);
        check<shape_error>(n <= max_rank, "shape", "rank ", n, " exceeds the maximum of ", max_rank);
        rank_ = static_cast<int>(n);
        std::size_t i = 0;
        for (; first != last; ++first, ++i) {
            check<shape_error>(*first >= 0, "shape", "negative dimension ", *first);
            dims_[i] = *first;
        }
    }

    std::array<index_t, max_rank> dims_{};
    int rank_ = 0;
};

/// The numpy broadcast of two shapes; throws shape_error when incompatible.
inline shape broadcast_shapes(const shape& a, const shape& b) {
    const int rank = std::max(a.rank(), b.rank());
    std::vector<index_t> out(static_cast<std::size_t>(rank));
    for (int i = 0; i < rank; ++i) {
        const int ia = a.rank() - rank + i, ib = b.rank() - rank + i;
        const index_t da = ia >= 0 ? a[ia] : 1, db = ib >= 0 ? b[ib] : 1;
        check<shape_error>(da == db || da == 1 || db == 1, "broadcast", "cannot broadcast ", a.str(), " with ", b.str());
        out[static_cast<std::size_t>(i)] = da == 1 ? db : da;
    }
    return shape(out);
}

/// Strides that read a contiguous tensor of shape `from` as if it had shape
/// `to` (numpy broadcasting): broadcast dimensions get stride 0.
inline std::array<index_t, max_rank> broadcast_strides(const shape& from, const shape& to) {
    std::array<index_t, max_rank> out{};
    const auto own = from.strides();
    for (int i = 0; i < to.rank(); ++i) {
        const int j = from.rank() - to.rank() + i;
        out[static_cast<std::size_t>(i)] = (j < 0 || from[j] == 1) ? 0 : own[static_cast<std::size_t>(j)];
    }
    return out;
}

}  // namespace dynamicid
