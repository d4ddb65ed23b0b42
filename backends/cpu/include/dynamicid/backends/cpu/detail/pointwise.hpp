// dynamicid cpu backend, internal: scalar forms of the pointwise functions and their derivatives.
#pragma once

#include <dynamicid/core/descriptors.hpp>

#include <cmath>

namespace dynamicid::cpu::detail {

template <class A>
inline A sigmoid(A x) {
    return x >= A(0) ? A(1) / (A(1) + std::exp(-x)) : std::exp(x) / (A(1) + std::exp(x));
}

template <class A>
inline A unary_value(unary_op op, A x) {
    constexpr A inv_sqrt2 = A(0.70710678118654752440);
    constexpr A tanh_c = A(0.79788456080286535588);  // sqrt(2/pi)
    switch (op) {
        case unary_op::relu: return x > A(0) ? x : A(0);
        case unary_op::silu: return x * sigmoid(x);
        case unary_op::gelu_erf: return A(0.5) * x * (A(1) + std::erf(x * inv_sqrt2));
        case unary_op::gelu_tanh: return A(0.5) * x * (A(1) + std::tanh(tanh_c * (x + A(0.044715) * x * x * x)));
        case unary_op::quick_gelu: return x * sigmoid(A(1.702) * x);
        case unary_op::sigmoid: return sigmoid(x);
        case unary_op::tanh: return std::tanh(x);
        case unary_op::exp: return std::exp(x);
        case unary_op::square: return x * x;
        case unary_op::sqrt: return std::sqrt(x);
    }
    return x;
}

// d f(x) / dx.
template <class A>
inline A unary_derivative(unary_op op, A x) {
    constexpr A inv_sqrt2 = A(0.70710678118654752440);
    constexpr A inv_sqrt_2pi = A(0.39894228040143267794);
    constexpr A tanh_c = A(0.79788456080286535588);
    switch (op) {
        case unary_op::relu: return x > A(0) ? A(1) : A(0);
        case unary_op::silu: {
            const A s = sigmoid(x);
            return s * (A(1) + x * (A(1) - s));
        }
        case unary_op::gelu_erf: return A(0.5) * (A(1) + std::erf(x * inv_sqrt2)) + x * inv_sqrt_2pi * std::exp(A(-0.5) * x * x);
        case unary_op::gelu_tanh: {
            const A t = std::tanh(tanh_c * (x + A(0.044715) * x * x * x));
            return A(0.5) * (A(1) + t) + A(0.5) * x * (A(1) - t * t) * tanh_c * (A(1) + A(3 * 0.044715) * x * x);
        }
        case unary_op::quick_gelu: {
            const A s = sigmoid(A(1.702) * x);
            return s + A(1.702) * x * s * (A(1) - s);
        }
        case unary_op::sigmoid: {
            const A s = sigmoid(x);
            return s * (A(1) - s);
        }
        case unary_op::tanh: {
            const A t = std::tanh(x);
            return A(1) - t * t;
        }
        case unary_op::exp: return std::exp(x);
        case unary_op::square: return A(2) * x;
        case unary_op::sqrt: return A(0.5) / std::sqrt(x);
    }
    return A(0);
}

template <class A>
inline A binary_value(binary_op op, A a, A b) {
    switch (op) {
        case binary_op::add: return a + b;
        case binary_op::sub: return a - b;
        case binary_op::mul: return a * b;
        case binary_op::div: return a / b;
        case binary_op::maximum: return a >= b ? a : b;
        case binary_op::minimum: return a <= b ? a : b;
    }
    return a;
}

// Partial derivatives (d/da, d/db); ties of maximum/minimum go to a.
template <class A>
inline void binary_partials(binary_op op, A a, A b, A& da, A& db) {
    switch (op) {
        case binary_op::add: da = A(1); db = A(1); return;
        case binary_op::sub: da = A(1); db = A(-1); return;
        case binary_op::mul: da = b; db = a; return;
        case binary_op::div: da = A(1) / b; db = -a / (b * b); return;
        case binary_op::maximum: da = a >= b ? A(1) : A(0); db = A(1) - da; return;
        case binary_op::minimum: da = a <= b ? A(1) : A(0); db = A(1) - da; return;
    }
}

}  // namespace dynamicid::cpu::detail
