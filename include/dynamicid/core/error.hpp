// dynamicid: the exception hierarchy.
//
// Every error the library reports is an exception derived from
// dynamicid::error whose message starts with "[component]". Library code never
// aborts, exits or prints; it throws.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace dynamicid {

/// Base of every exception thrown by dynamicid.
///
///     try { auto f = io::safetensors_file::open("model.safetensors"); }
///     catch (const dynamicid::error& e) { std::cerr << e.what(); }  // "[safetensors] ..."
class error : public std::runtime_error {
public:
    error(std::string_view component, const std::string& message)
        : std::runtime_error(compose(component, message)), component_(component) {}

    /// The component named in brackets at the start of what().
    const std::string& component() const noexcept { return component_; }

private:
    // Appending piecewise (rather than chaining operator+) avoids a GCC 12 -Wrestrict false positive.
    static std::string compose(std::string_view component, const std::string& message) {
        std::string text;
        text.reserve(component.size() + message.size() + 3);
        text += '[';
        text += component;
        text += "] ";
        text += message;
        return text;
    }

    std::string component_;
};

/// A tensor's shape, rank or dtype does not fit what an operation expects.
class shape_error : public error {
public:
    using error::error;
};

/// A file is missing, truncated, malformed or hostile.
class io_error : public error {
public:
    using error::error;
};

/// A value is outside its documented domain (bad box, NaN, negative size...).
class value_error : public error {
public:
    using error::error;
};

/// The backend cannot run this operation for this element type or layout.
class unsupported_error : public error {
public:
    using error::error;
};

/// A long-running call was stopped by its cancellation token.
class cancelled_error : public error {
public:
    using error::error;
};

namespace detail {

template <class... Args>
std::string concat_message(Args&&... args) {
    std::ostringstream out;
    (out << ... << std::forward<Args>(args));
    return out.str();
}

}  // namespace detail

/// Throws `Error{component, message...}` when `condition` is false.
template <class Error = value_error, class... Args>
void check(bool condition, std::string_view component, Args&&... message) {
    if (!condition) throw Error(component, detail::concat_message(std::forward<Args>(message)...));
}

}  // namespace dynamicid
