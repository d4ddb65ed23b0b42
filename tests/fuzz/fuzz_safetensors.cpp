// libFuzzer entry point for the safetensors reader.
//
// Every input must either be rejected with a dynamicid::error or parse into a
// file whose tensors all convert; anything else (a crash, a sanitizer report,
// another exception type) is a bug. Accepted inputs are also re-encoded with
// safetensors_writer and parsed again, which must reproduce them exactly.
//
//     ./fuzz_safetensors corpus_dir tests/data/bad_safetensors -max_len=4096
#include <dynamicid/io/safetensors.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace {

void check_round_trip(const dynamicid::io::safetensors_file& file) {
    dynamicid::io::safetensors_writer writer;
    for (const auto& name : file.names()) {
        const auto& info = file.info(name);
        writer.add_bytes(name, info.type, info.dims, file.bytes(name));
    }
    for (const auto& [key, value] : file.metadata()) writer.set_metadata(key, value);
    const auto again = dynamicid::io::safetensors_file::from_memory(writer.to_bytes());
    if (again.names() != file.names() || again.metadata() != file.metadata()) __builtin_trap();
    for (const auto& name : file.names()) {
        const auto a = file.bytes(name), b = again.bytes(name);
        if (again.info(name).type != file.info(name).type || !(again.info(name).dims == file.info(name).dims) ||
            a.size() != b.size() || !std::equal(a.begin(), a.end(), b.begin()))
            __builtin_trap();
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    try {
        const auto file = dynamicid::io::safetensors_file::from_memory(
            std::span<const std::byte>(reinterpret_cast<const std::byte*>(data), size));
        for (const auto& name : file.names()) {
            const auto& info = file.info(name);
            const std::vector<float> values = file.to_vector<float>(name);
            if (values.size() != static_cast<std::size_t>(info.dims.numel())) __builtin_trap();
            if (file.bytes(name).size() != info.bytes) __builtin_trap();
        }
        check_round_trip(file);
    } catch (const dynamicid::error&) {
        // Rejecting hostile input with a dynamicid::error is the expected outcome.
    }
    return 0;
}
