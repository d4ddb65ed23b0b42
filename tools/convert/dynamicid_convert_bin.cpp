// dynamicid-convert: turns PyTorch checkpoints (torch.save .bin/.pt files,
// such as DynamicID's SAA.bin, IMR.bin, key_point_encoder.bin) into
// safetensors, without executing any pickle code.
//
// Usage:
//   dynamicid-convert [--subtree KEY] IN.bin OUT.safetensors
//       every tensor (or those below KEY, e.g. proj_module), names joined with "."
//   dynamicid-convert --split IN.bin OUT_DIR
//       one OUT_DIR/<key>.safetensors per top-level dict entry holding tensors
//       (SAA.bin -> proj_module.safetensors, SAA_module.safetensors)
//   dynamicid-convert --list IN.bin
//       prints each tensor's name, dtype, shape and layout
//
// Exit status: 0 on success, 1 on a wrong command line, 3 when the input
// cannot be read (hostile or malformed files included) or the output cannot
// be written.
#include <dynamicid/io/torch_checkpoint.hpp>

#include <exception>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

namespace {

constexpr int exit_ok = 0, exit_usage = 1, exit_error = 3;

void usage(std::ostream& out) {
    out << "usage: dynamicid-convert [--subtree KEY] IN.bin OUT.safetensors\n"
           "       dynamicid-convert --split IN.bin OUT_DIR\n"
           "       dynamicid-convert --list IN.bin\n"
           "  --subtree  convert only the tensors below this '.'-separated key path\n"
           "  --split    write one safetensors file per top-level entry\n"
           "  --list     print the tensors instead of converting\n";
}

std::string layout(const dynamicid::io::torch_tensor& t) {
    std::string s = t.is_contiguous() ? "contiguous" : "strided";
    s += " storage=" + t.storage_key() + " offset=" + std::to_string(t.storage_offset());
    return s;
}

}  // namespace

int main(int argc, char** argv) {
    std::string subtree;
    bool split = false, list = false;
    std::vector<std::string> paths;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        if (arg == "-h" || arg == "--help") {
            usage(std::cout);
            return exit_ok;
        } else if (arg == "--subtree" && i + 1 < argc) {
            subtree = argv[++i];
        } else if (arg == "--split") {
            split = true;
        } else if (arg == "--list") {
            list = true;
        } else if (!arg.empty() && arg[0] == '-') {
            usage(std::cerr);
            return exit_usage;
        } else {
            paths.push_back(arg);
        }
    }
    if ((list && paths.size() != 1) || (!list && paths.size() != 2) || (split && (list || !subtree.empty()))) {
        usage(std::cerr);
        return exit_usage;
    }

    try {
        const auto ckpt = dynamicid::io::torch_checkpoint::open(paths[0]);
        if (list) {
            for (const auto& [name, t] : dynamicid::io::flatten(ckpt.subtree(subtree)))
                std::cout << name << ' ' << dynamicid::name_of(t.type()) << ' ' << t.dims().str() << ' ' << layout(t) << '\n';
            return exit_ok;
        }
        if (split) {
            const std::filesystem::path dir = paths[1];
            std::filesystem::create_directories(dir);
            const auto& root = ckpt.root();
            if (!root.is_dict()) throw dynamicid::io_error("convert", "--split needs a checkpoint whose top level is a dict");
            int written = 0;
            for (std::size_t i = 0; i < root.keys().size(); ++i) {
                auto writer = dynamicid::io::to_safetensors_writer(root.children()[i]);
                if (writer.size() == 0) continue;
                const auto out = dir / (root.keys()[i] + ".safetensors");
                writer.write(out);
                std::cout << out.string() << ": " << writer.size() << " tensors\n";
                ++written;
            }
            if (written == 0) throw dynamicid::io_error("convert", "no top-level entry holds tensors");
            return exit_ok;
        }
        auto writer = dynamicid::io::to_safetensors_writer(ckpt.subtree(subtree));
        writer.write(paths[1]);
        std::cout << paths[1] << ": " << writer.size() << " tensors\n";
        return exit_ok;
    } catch (const std::exception& e) {
        std::cerr << "dynamicid-convert: " << e.what() << '\n';
        return exit_error;
    }
}
