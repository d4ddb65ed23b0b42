// dynamicid-conform: checks the library against golden safetensors cases.
//
// Usage: dynamicid-conform [--backend cpu] [--atol X] [--rtol Y] [--threads N] PATH...
//
// Each PATH is a golden file or a directory (searched recursively for
// *.safetensors, in sorted order). One line per reference output:
//
//     FILE output.NAME max_abs=... max_rel=... PASS|FAIL
//
// and for a file that cannot be checked:
//
//     FILE UNSUPPORTED module 'NAME'
//     FILE ERROR <message>
//
// Exit status: 0 when every output passes; 1 when any output fails or a
// handler raised an error; otherwise 3 when a file could not be read or
// parsed (or the command line is wrong); otherwise 2 when some file names a
// module this build does not support.
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/conform/conform.hpp>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

namespace {

constexpr int exit_pass = 0, exit_fail = 1, exit_unsupported = 2, exit_unreadable = 3;

void usage(std::ostream& out) {
    out << "usage: dynamicid-conform [--backend cpu] [--atol X] [--rtol Y] [--threads N] PATH...\n"
           "  PATH      a golden .safetensors file, or a directory searched recursively\n"
           "  --backend backend to run on (only 'cpu' in this build)\n"
           "  --atol    absolute tolerance, overriding the case and the default\n"
           "  --rtol    relative tolerance (times max|ref|), overriding the case and the default\n"
           "  --threads CPU threads (0 = all)\n"
           "exit: 0 all pass, 1 some output fails, 2 unsupported module, 3 unreadable file or bad arguments\n";
}

std::optional<double> parse_number(const std::string& s) {
    try {
        std::size_t used = 0;
        const double v = std::stod(s, &used);
        if (used != s.size() || !(v >= 0.0)) return std::nullopt;
        return v;
    } catch (const std::exception&) {
        return std::nullopt;
    }
}

std::string format(double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.3e", v);
    return buf;
}

struct tally {
    int outputs = 0, passed = 0, failed = 0, unsupported = 0, unreadable = 0, errors = 0;
};

}  // namespace

int main(int argc, char** argv) {
    namespace fs = std::filesystem;
    namespace conform = dynamicid::conform;

    std::string backend = "cpu";
    conform::run_options options;
    int threads = 0;
    std::vector<std::string> paths;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        const auto value = [&](const char* flag) -> std::optional<std::string> {
            if (i + 1 >= argc) {
                std::cerr << "dynamicid-conform: " << flag << " needs a value\n";
                return std::nullopt;
            }
            return std::string(argv[++i]);
        };
        if (arg == "-h" || arg == "--help") {
            usage(std::cout);
            return exit_pass;
        } else if (arg == "--backend") {
            const auto v = value("--backend");
            if (!v) return exit_unreadable;
            backend = *v;
        } else if (arg == "--atol" || arg == "--rtol") {
            const auto v = value(arg.c_str());
            const auto number = v ? parse_number(*v) : std::nullopt;
            if (!number) {
                std::cerr << "dynamicid-conform: " << arg << " needs a non-negative number\n";
                return exit_unreadable;
            }
            (arg == "--atol" ? options.atol : options.rtol) = *number;
        } else if (arg == "--threads") {
            const auto v = value("--threads");
            const auto number = v ? parse_number(*v) : std::nullopt;
            if (!number || *number != static_cast<double>(static_cast<int>(*number))) {
                std::cerr << "dynamicid-conform: --threads needs a non-negative integer\n";
                return exit_unreadable;
            }
            threads = static_cast<int>(*number);
        } else if (arg.size() > 1 && arg[0] == '-') {
            std::cerr << "dynamicid-conform: unknown option " << arg << "\n";
            usage(std::cerr);
            return exit_unreadable;
        } else {
            paths.push_back(arg);
        }
    }
    if (backend != "cpu") {
        std::cerr << "dynamicid-conform: backend '" << backend << "' is not available in this build (available: cpu)\n";
        return exit_unreadable;
    }
    if (paths.empty()) {
        usage(std::cerr);
        return exit_unreadable;
    }

    tally t;
    std::vector<std::string> files;
    for (const auto& p : paths) {
        std::error_code ec;
        if (fs::is_directory(p, ec)) {
            std::vector<std::string> found;
            for (fs::recursive_directory_iterator it(p, ec), end; !ec && it != end; it.increment(ec))
                if (it->is_regular_file() && it->path().extension() == ".safetensors") found.push_back(it->path().string());
            if (ec) {
                std::cout << p << " ERROR cannot list directory: " << ec.message() << "\n";
                ++t.unreadable;
            }
            std::sort(found.begin(), found.end());
            if (found.empty() && !ec) std::cerr << "dynamicid-conform: warning: no .safetensors files under " << p << "\n";
            files.insert(files.end(), found.begin(), found.end());
        } else {
            files.push_back(p);
        }
    }

    dynamicid::cpu_backend::context ctx{.threads = threads};
    const auto registry = conform::registry<dynamicid::cpu_backend>::builtin();
    for (const auto& file : files) {
        std::optional<conform::golden_case> golden;
        try {
            golden.emplace(conform::golden_case::open(file));
        } catch (const std::exception& e) {
            std::cout << file << " ERROR " << e.what() << "\n";
            ++t.unreadable;
            continue;
        }
        try {
            for (const auto& r : conform::run_case(ctx, registry, *golden, options)) {
                std::cout << r.file << ' ' << r.name << " max_abs=" << format(r.max_abs) << " max_rel=" << format(r.max_rel)
                          << (r.pass ? " PASS" : " FAIL");
                if (!r.note.empty()) std::cout << " (" << r.note << ")";
                std::cout << "\n";
                ++t.outputs;
                ++(r.pass ? t.passed : t.failed);
            }
        } catch (const conform::unsupported_module& e) {
            std::cout << file << " UNSUPPORTED module '" << e.module() << "'\n";
            ++t.unsupported;
        } catch (const std::exception& e) {
            std::cout << file << " ERROR " << e.what() << "\n";
            ++t.errors;
        }
    }
    std::cout << "summary: " << files.size() << " files, " << t.outputs << " outputs, " << t.passed << " passed, " << t.failed
              << " failed, " << t.unsupported << " unsupported, " << t.unreadable << " unreadable, " << t.errors << " errors\n";
    if (t.failed || t.errors) return exit_fail;
    if (t.unreadable) return exit_unreadable;
    if (t.unsupported) return exit_unsupported;
    return exit_pass;
}
