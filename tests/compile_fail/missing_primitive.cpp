// Must not compile: the type opts in through enable_backend and provides
// memory and every primitive except softmax_backward. The concept check next
// to the definition should name the missing primitive. Built with
// DYNAMICID_COMPILE_FAIL_CONTROL defined it is complete and must compile.
#include <dynamicid/core/backend.hpp>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace {

struct almost_backend {
    struct context {};
    template <class T> using pointer = T*;
    template <class T> using const_pointer = const T*;
    template <class T>
    using buffer = std::vector<T>;

    static constexpr const char* name() { return "almost"; }
    static void synchronize(context&) {}

    template <class T> static buffer<T> allocate(context&, std::size_t n) { return buffer<T>(n); }
    template <class T> static void copy_to_host(context&, const T*, T*, std::size_t) {}
    template <class T> static void copy_from_host(context&, const T*, T*, std::size_t) {}
    template <class T> static void copy(context&, const T*, T*, std::size_t) {}
    template <class T> static void fill(context&, T*, std::size_t, T) {}
    template <class From, class To> static void convert(context&, const From*, To*, std::size_t) {}

    template <class... A> static void gemm(context&, const dynamicid::gemm_desc&, A...) {}
    template <class... A> static void conv2d_forward(context&, const dynamicid::conv2d_desc&, A...) {}
    template <class... A> static void conv2d_backward_data(context&, const dynamicid::conv2d_desc&, A...) {}
    template <class... A> static void conv2d_backward_weight(context&, const dynamicid::conv2d_desc&, A...) {}
    template <class... A> static void group_norm_forward(context&, const dynamicid::group_norm_desc&, A...) {}
    template <class... A> static void group_norm_backward(context&, const dynamicid::group_norm_desc&, A...) {}
    template <class... A> static void layer_norm_forward(context&, const dynamicid::layer_norm_desc&, A...) {}
    template <class... A> static void layer_norm_backward(context&, const dynamicid::layer_norm_desc&, A...) {}
    template <class... A> static void softmax_forward(context&, const dynamicid::softmax_desc&, A...) {}
#ifdef DYNAMICID_COMPILE_FAIL_CONTROL
    // The control build adds the primitive back and must compile, which shows
    // that the real build fails for the missing primitive and nothing else.
    template <class... A> static void softmax_backward(context&, const dynamicid::softmax_desc&, A...) {}
#endif
    template <class... A> static void unary_forward(context&, dynamicid::unary_op, A...) {}
    template <class... A> static void unary_backward(context&, dynamicid::unary_op, A...) {}
    template <class... A> static void geglu_forward(context&, const dynamicid::geglu_desc&, A...) {}
    template <class... A> static void geglu_backward(context&, const dynamicid::geglu_desc&, A...) {}
    template <class... A> static void binary_forward(context&, dynamicid::binary_op, A...) {}
    template <class... A> static void binary_backward(context&, dynamicid::binary_op, A...) {}
    template <class... A> static void reduce_forward(context&, const dynamicid::reduce_desc&, A...) {}
    template <class... A> static void reduce_backward(context&, const dynamicid::reduce_desc&, A...) {}
    template <class... A> static void strided_copy(context&, const dynamicid::strided_copy_desc&, A...) {}
    template <class... A> static void upsample_nearest_forward(context&, const dynamicid::upsample_desc&, A...) {}
    template <class... A> static void upsample_nearest_backward(context&, const dynamicid::upsample_desc&, A...) {}
    template <class... A> static void axpby(context&, std::size_t, A...) {}
    template <class... A> static void random_uniform(context&, std::uint64_t, std::uint64_t, std::size_t, A...) {}
    template <class... A> static void random_normal(context&, std::uint64_t, std::uint64_t, std::size_t, A...) {}
};

}  // namespace

template <>
inline constexpr bool dynamicid::enable_backend<almost_backend> = true;

// Conformance is stated next to the type, as every backend header does.
static_assert(dynamicid::backend<almost_backend>, "almost_backend must model dynamicid::backend");

int main() { return 0; }
