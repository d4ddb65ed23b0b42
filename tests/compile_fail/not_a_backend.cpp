// Must not compile: a type that never opted in is not a backend, even if it
// is shaped like one. The diagnostic should point at enable_backend.
#include <dynamicid/dynamicid.hpp>

#include <cstddef>

namespace {

struct not_a_backend {
    struct context {};
    template <class T> using pointer = T*;
    template <class T> using const_pointer = const T*;
    static constexpr const char* name() { return "not_a_backend"; }
    static void synchronize(context&) {}
};

}  // namespace

int main() {
    dynamicid::tensor<not_a_backend, float> t;
    static_cast<void>(t);
    return 0;
}
