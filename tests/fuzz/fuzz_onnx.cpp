// libFuzzer entry point for the ONNX model reader (face/onnx/reader.hpp).
//
// Every input must either be rejected with a dynamicid::error or give a model
// whose graph is self-consistent (every initializer's data matches its shape).
// A crash, a sanitizer report or another exception type is a bug.
//
//     ./fuzz_onnx corpus_dir tests/data/face/bad_onnx -max_len=8192
#include <dynamicid/face/onnx/reader.hpp>

#include <cstddef>
#include <cstdint>
#include <span>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    try {
        // No base folder: external data is refused, so the fuzzer never reads files.
        const auto m = dynamicid::face::onnx::parse_model(std::span<const char>(reinterpret_cast<const char*>(data), size), {}, {},
                                                          "fuzz input");
        for (const auto& t : m.graph.initializers) {
            for (auto d : t.dims)
                if (d < 0) __builtin_trap();
            if (static_cast<std::int64_t>(t.size()) != t.numel()) __builtin_trap();
        }
    } catch (const dynamicid::error&) {
        // Rejecting hostile input with a dynamicid::error is the expected outcome.
    }
    return 0;
}
