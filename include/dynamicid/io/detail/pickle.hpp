// dynamicid io (internal): a pickle reader that executes nothing.
//
// PyTorch checkpoints store their object tree as a Python pickle: a program
// for a small stack machine whose GLOBAL and REDUCE opcodes import and call
// arbitrary Python callables. Running such a program is running the file's
// code. This reader interprets the opcodes symbolically instead: values are
// plain data in an arena, GLOBAL resolves only the handful of names a state
// dict needs (collections.OrderedDict, torch._utils' tensor rebuild functions
// and torch's typed storage classes) and refuses every other name, and REDUCE
// applies those names by their known meaning (an empty dict, a tensor view
// over a storage) rather than calling anything. Persistent ids (BINPERSID)
// are read in torch's convention ('storage', type, key, location, numel[,
// view]) and become storage references the caller resolves.
//
// Values live in one arena and refer to each other by index, so cyclic or
// deeply nested pickles cannot overflow the stack or leak when destroyed;
// consumers walk them with an explicit depth limit. Stack, memo and arena
// sizes are capped.
//
//     dynamicid::io::detail::pickle_machine m("model/data.pkl");
//     auto end = m.run(bytes);                 // offset after STOP
//     const auto& root = m.value(m.result());  // e.g. a dict
#pragma once

#include <dynamicid/core/config.hpp>
#include <dynamicid/core/dtype.hpp>
#include <dynamicid/core/error.hpp>
#include <dynamicid/io/detail/byte_source.hpp>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace dynamicid::io::detail {

inline constexpr std::string_view pickle_component = "pickle";

/// The names GLOBAL may resolve; anything else is refused.
enum class pickle_global : std::uint8_t {
    ordered_dict,                  ///< collections.OrderedDict
    rebuild_tensor,                ///< torch._utils._rebuild_tensor
    rebuild_tensor_v2,             ///< torch._utils._rebuild_tensor_v2
    rebuild_parameter,             ///< torch._utils._rebuild_parameter
    rebuild_parameter_with_state,  ///< torch._utils._rebuild_parameter_with_state
    rebuild_from_type_v2,          ///< torch._tensor._rebuild_from_type_v2
    tensor_class,                  ///< torch.Tensor (as a _rebuild_from_type_v2 argument only)
    parameter_class,               ///< torch.nn.Parameter (likewise)
    storage_type,                  ///< torch.<Type>Storage (in persistent ids only)
};

enum class pickle_kind : std::uint8_t {
    none, boolean, integer, big_integer, floating, string, bytes, tuple, list, dict, global, storage, tensor
};

/// A storage named by a persistent id: `numel` elements of `type` in the
/// blob called `key`, seen from element `offset` (non-zero only for the
/// legacy format's storage views).
struct pickle_storage {
    dtype type = dtype::f32;
    std::string key;
    std::string location;
    std::int64_t numel = 0;
    std::int64_t offset = 0;
    std::int64_t root_numel = -1;  ///< legacy views: the size of the whole storage
};

/// A strided view of a storage, as torch._utils._rebuild_tensor_v2 builds it.
struct pickle_tensor {
    std::uint32_t storage = 0;  ///< arena index of a pickle_kind::storage value
    std::int64_t offset = 0;    ///< in elements
    std::vector<std::int64_t> sizes;
    std::vector<std::int64_t> strides;
};

/// One value of the symbolic machine.
struct pickle_value {
    pickle_kind kind = pickle_kind::none;
    bool flag = false;
    std::int64_t integer = 0;
    double real = 0.0;
    std::string text;                ///< string, bytes, big-integer bytes (little-endian), global "module.name"
    std::vector<std::uint32_t> items;  ///< tuple/list elements; dict as key, value, key, value...
    pickle_global global = pickle_global::ordered_dict;
    dtype storage_type = dtype::f32;  ///< for pickle_global::storage_type
    pickle_storage storage;
    pickle_tensor tensor;
};

/// Limits of the machine; the defaults are far above what checkpoints use.
struct pickle_limits {
    std::size_t max_stack = std::size_t{1} << 20;
    std::size_t max_values = std::size_t{1} << 22;
    std::size_t max_memo = std::size_t{1} << 24;
};

/// The symbolic pickle machine. One run() per pickle; the arena persists
/// across runs so several pickles of one file can be read in turn.
class pickle_machine {
public:
    explicit pickle_machine(std::string source, pickle_limits limits = {}) : source_(std::move(source)), limits_(limits) {}

    /// Interprets the pickle starting at `start` up to its STOP; returns the
    /// offset just after STOP. The value left on the stack is result().
    std::size_t run(std::span<const std::byte> data, std::size_t start = 0) {
        data_ = data;
        pos_ = start;
        stack_.clear();
        marks_.clear();
        memo_.clear();
        for (;;) {
            const std::size_t at = pos_;
            const auto op = static_cast<std::uint8_t>(read_byte());
            if (op == '.') {
                if (!marks_.empty()) fail_at(at, "STOP with an open MARK");
                if (stack_.size() != 1) fail_at(at, "STOP leaves " + std::to_string(stack_.size()) + " values on the stack, expected 1");
                result_ = stack_.back();
                stack_.clear();
                return pos_;
            }
            step(op, at);
        }
    }

    std::uint32_t result() const noexcept { return result_; }
    const pickle_value& value(std::uint32_t index) const { return values_.at(index); }
    std::uint32_t value_count() const noexcept { return static_cast<std::uint32_t>(values_.size()); }
    const std::string& source() const noexcept { return source_; }

    /// The value as a Python-like type name, for messages.
    std::string describe(std::uint32_t index) const {
        const auto& v = values_.at(index);
        switch (v.kind) {
            case pickle_kind::none: return "None";
            case pickle_kind::boolean: return "bool";
            case pickle_kind::integer: case pickle_kind::big_integer: return "int";
            case pickle_kind::floating: return "float";
            case pickle_kind::string: return "str";
            case pickle_kind::bytes: return "bytes";
            case pickle_kind::tuple: return "tuple";
            case pickle_kind::list: return "list";
            case pickle_kind::dict: return "dict";
            case pickle_kind::global: return "global '" + v.text + "'";
            case pickle_kind::storage: return "storage";
            case pickle_kind::tensor: return "tensor";
        }
        return "?";
    }

    /// Bytes of a Python int written as LONG1 (little-endian two's complement), if it was one.
    bool is_big_integer(std::uint32_t index, std::span<const std::uint8_t> le_bytes) const {
        const auto& v = values_.at(index);
        if (v.kind != pickle_kind::big_integer || v.text.size() != le_bytes.size()) return false;
        return std::memcmp(v.text.data(), le_bytes.data(), le_bytes.size()) == 0;
    }

private:
    [[noreturn]] void fail_at(std::size_t at, const std::string& message) const {
        throw io_error(pickle_component, source_ + ": " + message + " (at byte " + std::to_string(at) + ")");
    }
    [[noreturn]] void fail(const std::string& message) const { fail_at(pos_, message); }

    // ---- input --------------------------------------------------------------
    std::span<const std::byte> take(std::uint64_t n) {
        if (n > data_.size() - pos_) fail("truncated pickle: needs " + std::to_string(n) + " more bytes, " +
                                         std::to_string(data_.size() - pos_) + " left");
        const auto out = data_.subspan(pos_, static_cast<std::size_t>(n));
        pos_ += static_cast<std::size_t>(n);
        return out;
    }
    std::byte read_byte() { return take(1)[0]; }
    template <class U>
    U read_le() { return load_le<U>(take(sizeof(U)).data()); }
    std::string read_string(std::uint64_t n) {
        const auto b = take(n);
        return std::string(reinterpret_cast<const char*>(b.data()), b.size());
    }
    std::string read_line() {
        constexpr std::size_t max_line = 1024;
        std::string out;
        for (;;) {
            const char c = static_cast<char>(read_byte());
            if (c == '\n') return out;
            if (out.size() == max_line) fail("text argument longer than " + std::to_string(max_line) + " bytes");
            out.push_back(c);
        }
    }

    // ---- arena and stack ------------------------------------------------------
    std::uint32_t make(pickle_value v) {
        if (values_.size() >= limits_.max_values) fail("pickle creates more than " + std::to_string(limits_.max_values) + " values");
        values_.push_back(std::move(v));
        return static_cast<std::uint32_t>(values_.size() - 1);
    }
    std::uint32_t make_kind(pickle_kind k) {
        pickle_value v;
        v.kind = k;
        return make(std::move(v));
    }
    void push(std::uint32_t index) {
        if (stack_.size() >= limits_.max_stack) fail("pickle stack deeper than " + std::to_string(limits_.max_stack));
        stack_.push_back(index);
    }
    std::size_t floor() const { return marks_.empty() ? 0 : marks_.back(); }
    std::uint32_t pop() {
        if (stack_.size() <= floor()) fail("pickle stack underflow");
        const auto v = stack_.back();
        stack_.pop_back();
        return v;
    }
    std::uint32_t top() {
        if (stack_.size() <= floor()) fail("pickle stack underflow");
        return stack_.back();
    }
    std::vector<std::uint32_t> pop_mark() {
        if (marks_.empty()) fail("no MARK to pop to");
        const std::size_t m = marks_.back();
        marks_.pop_back();
        std::vector<std::uint32_t> out(stack_.begin() + static_cast<std::ptrdiff_t>(m), stack_.end());
        stack_.resize(m);
        return out;
    }
    void memo_put(std::uint32_t key) {
        if (stack_.size() <= floor()) fail("memoising with an empty stack");
        if (memo_.size() >= limits_.max_memo && !memo_.contains(key))
            fail("pickle memo holds more than " + std::to_string(limits_.max_memo) + " values");
        memo_[key] = stack_.back();
    }
    void memo_get(std::uint64_t key) {
        const auto it = memo_.find(key);
        if (it == memo_.end()) fail("memo key " + std::to_string(key) + " was never stored");
        push(it->second);
    }
    pickle_value& mut(std::uint32_t index) { return values_[index]; }

    std::uint32_t make_int(std::int64_t i) {
        pickle_value v;
        v.kind = pickle_kind::integer;
        v.integer = i;
        return make(std::move(v));
    }
    std::uint32_t make_text(pickle_kind k, std::string s) {
        pickle_value v;
        v.kind = k;
        v.text = std::move(s);
        return make(std::move(v));
    }
    std::uint32_t make_tuple(std::vector<std::uint32_t> items) {
        pickle_value v;
        v.kind = pickle_kind::tuple;
        v.items = std::move(items);
        return make(std::move(v));
    }
    std::uint32_t make_long(std::span<const std::byte> b) {
        if (b.empty()) return make_int(0);
        if (b.size() <= 8) {
            std::uint64_t u = 0;
            for (std::size_t i = 0; i < b.size(); ++i) u |= static_cast<std::uint64_t>(b[i]) << (8 * i);
            const bool negative = (static_cast<std::uint8_t>(b.back()) & 0x80u) != 0;
            if (negative && b.size() < 8) u |= ~std::uint64_t{0} << (8 * b.size());
            return make_int(std::bit_cast<std::int64_t>(u));
        }
        return make_text(pickle_kind::big_integer, std::string(reinterpret_cast<const char*>(b.data()), b.size()));
    }

    // ---- globals ----------------------------------------------------------------
    std::uint32_t resolve_global(const std::string& module, const std::string& name) {
        const std::string full = module + "." + name;
        pickle_value v;
        v.kind = pickle_kind::global;
        v.text = full;
        static constexpr struct {
            std::string_view name;
            pickle_global g;
        } functions[] = {
            {"collections.OrderedDict", pickle_global::ordered_dict},
            {"torch._utils._rebuild_tensor", pickle_global::rebuild_tensor},
            {"torch._utils._rebuild_tensor_v2", pickle_global::rebuild_tensor_v2},
            {"torch._utils._rebuild_parameter", pickle_global::rebuild_parameter},
            {"torch._utils._rebuild_parameter_with_state", pickle_global::rebuild_parameter_with_state},
            {"torch._tensor._rebuild_from_type_v2", pickle_global::rebuild_from_type_v2},
            {"torch._tensor.Tensor", pickle_global::tensor_class},
            {"torch.Tensor", pickle_global::tensor_class},
            {"torch.nn.parameter.Parameter", pickle_global::parameter_class},
        };
        for (const auto& f : functions)
            if (f.name == full) {
                v.global = f.g;
                return make(std::move(v));
            }
        static constexpr struct {
            std::string_view name;
            dtype type;
        } storages[] = {
            {"torch.FloatStorage", dtype::f32},   {"torch.HalfStorage", dtype::f16}, {"torch.BFloat16Storage", dtype::bf16},
            {"torch.DoubleStorage", dtype::f64},  {"torch.LongStorage", dtype::i64}, {"torch.IntStorage", dtype::i32},
            {"torch.ByteStorage", dtype::u8},     {"torch.BoolStorage", dtype::boolean},
        };
        for (const auto& s : storages)
            if (s.name == full) {
                v.global = pickle_global::storage_type;
                v.storage_type = s.type;
                return make(std::move(v));
            }
        if (module == "torch" && name.ends_with("Storage"))
            fail("storage type '" + full + "' is not supported (supported: float64/32/16, bfloat16, int64, int32, uint8, bool)");
        fail("refusing global '" + full + "': only the names a PyTorch state dict needs are resolved, and nothing is executed");
    }

    // ---- helpers for REDUCE ---------------------------------------------------
    const pickle_value& need(std::uint32_t index, pickle_kind k, std::string_view what) {
        const auto& v = values_[index];
        if (v.kind != k) fail(std::string(what) + " is " + describe(index));
        return v;
    }
    std::int64_t need_int(std::uint32_t index, std::string_view what) {
        const auto& v = values_[index];
        if (v.kind == pickle_kind::boolean) return v.flag ? 1 : 0;
        if (v.kind != pickle_kind::integer) fail(std::string(what) + " is " + describe(index) + ", not an int");
        return v.integer;
    }
    std::vector<std::int64_t> need_int_tuple(std::uint32_t index, std::string_view what) {
        const auto& v = values_[index];
        if (v.kind != pickle_kind::tuple && v.kind != pickle_kind::list) fail(std::string(what) + " is " + describe(index) + ", not a tuple");
        std::vector<std::int64_t> out;
        for (auto i : values_[index].items) out.push_back(need_int(i, what));
        return out;
    }
    bool is_empty_dict_or_none(std::uint32_t index) const {
        const auto& v = values_[index];
        return v.kind == pickle_kind::none || (v.kind == pickle_kind::dict && v.items.empty());
    }

    std::uint32_t rebuild_tensor(const std::vector<std::uint32_t>& args, bool v2) {
        if (v2 ? (args.size() != 6 && args.size() != 7) : args.size() != 4)
            fail(std::string(v2 ? "_rebuild_tensor_v2" : "_rebuild_tensor") + " called with " + std::to_string(args.size()) + " arguments");
        const auto& st = need(args[0], pickle_kind::storage, "tensor storage").storage;
        pickle_value v;
        v.kind = pickle_kind::tensor;
        v.tensor.storage = args[0];
        v.tensor.offset = need_int(args[1], "tensor storage offset");
        v.tensor.sizes = need_int_tuple(args[2], "tensor size");
        v.tensor.strides = need_int_tuple(args[3], "tensor stride");
        if (v2) {
            if (!is_empty_dict_or_none(args[5])) fail("tensor has backward hooks, which are not supported");
            if (args.size() == 7 && !is_empty_dict_or_none(args[6])) {
                // Metadata is a dict of plain values (e.g. a hint); harmless but unused.
            }
        }
        const auto& t = v.tensor;
        if (t.sizes.size() != t.strides.size())
            fail("tensor has " + std::to_string(t.sizes.size()) + " sizes but " + std::to_string(t.strides.size()) + " strides");
        if (t.sizes.size() > static_cast<std::size_t>(max_rank))
            fail("tensor rank " + std::to_string(t.sizes.size()) + " exceeds the maximum of " + std::to_string(max_rank));
        if (t.offset < 0) fail("tensor storage offset " + std::to_string(t.offset) + " is negative");
        // The furthest element must lie inside the storage; computed without overflow.
        constexpr auto big = std::numeric_limits<std::int64_t>::max();
        std::int64_t last = t.offset;
        bool empty = false;
        std::int64_t numel = 1;
        for (std::size_t i = 0; i < t.sizes.size(); ++i) {
            const auto s = t.sizes[i], d = t.strides[i];
            if (s < 0) fail("tensor size " + std::to_string(s) + " is negative");
            if (d < 0) fail("tensor stride " + std::to_string(d) + " is negative");
            if (s == 0) empty = true;
            if (s != 0 && numel > big / s) fail("tensor element count overflows");
            numel = s == 0 ? 0 : numel * s;
            if (s > 0 && d > 0) {
                if (s - 1 > (big - last) / d) fail("tensor extent overflows");
                last += (s - 1) * d;
            }
        }
        if (!empty && last >= st.numel)
            fail("tensor view reaches element " + std::to_string(last) + " of storage '" + st.key + "', which holds " +
                 std::to_string(st.numel));
        return make(std::move(v));
    }

    std::uint32_t apply(std::uint32_t callable, std::uint32_t args_index) {
        const auto& c = values_[callable];
        if (c.kind != pickle_kind::global) fail("REDUCE on " + describe(callable) + ", which is not callable");
        const std::string name = c.text;
        const auto g = c.global;
        if (values_[args_index].kind != pickle_kind::tuple) fail("REDUCE arguments are " + describe(args_index) + ", not a tuple");
        const std::vector<std::uint32_t> args = values_[args_index].items;
        switch (g) {
            case pickle_global::ordered_dict: {
                const auto d = make_kind(pickle_kind::dict);
                if (args.empty()) return d;
                if (args.size() != 1) fail("OrderedDict called with " + std::to_string(args.size()) + " arguments");
                const auto& src = values_[args[0]];
                if (src.kind == pickle_kind::dict) {
                    mut(d).items = src.items;
                    return d;
                }
                if (src.kind != pickle_kind::list && src.kind != pickle_kind::tuple) fail("OrderedDict of " + describe(args[0]));
                std::vector<std::uint32_t> items;
                for (auto pair : src.items) {
                    const auto& p = values_[pair];
                    if (p.kind != pickle_kind::tuple || p.items.size() != 2) fail("OrderedDict item is not a pair");
                    items.push_back(p.items[0]);
                    items.push_back(p.items[1]);
                }
                mut(d).items = std::move(items);
                return d;
            }
            case pickle_global::rebuild_tensor: return rebuild_tensor(args, false);
            case pickle_global::rebuild_tensor_v2: return rebuild_tensor(args, true);
            case pickle_global::rebuild_parameter:
            case pickle_global::rebuild_parameter_with_state: {
                const std::size_t want = g == pickle_global::rebuild_parameter ? 3 : 4;
                if (args.size() != want) fail(name + " called with " + std::to_string(args.size()) + " arguments");
                need(args[0], pickle_kind::tensor, "parameter data");
                if (!is_empty_dict_or_none(args[2])) fail("parameter has backward hooks, which are not supported");
                if (want == 4 && !is_empty_dict_or_none(args[3])) fail("parameter carries Python state, which is not supported");
                return args[0];
            }
            case pickle_global::rebuild_from_type_v2: {
                if (args.size() != 4) fail(name + " called with " + std::to_string(args.size()) + " arguments");
                const auto& type = values_[args[1]];
                if (type.kind != pickle_kind::global ||
                    (type.global != pickle_global::tensor_class && type.global != pickle_global::parameter_class))
                    fail("tensor subclass " + describe(args[1]) + " is not supported");
                if (!is_empty_dict_or_none(args[3])) fail("tensor carries Python state, which is not supported");
                const auto inner = apply(args[0], args[2]);
                need(inner, pickle_kind::tensor, name + " result");
                return inner;
            }
            case pickle_global::tensor_class:
            case pickle_global::parameter_class:
            case pickle_global::storage_type: break;
        }
        fail("refusing to call '" + name + "'");
    }

    std::uint32_t persistent_load(std::uint32_t pid) {
        const auto& p = values_[pid];
        if (p.kind != pickle_kind::tuple || p.items.empty()) fail("persistent id is " + describe(pid) + ", not a tuple");
        const auto& tag = values_[p.items[0]];
        if (tag.kind != pickle_kind::string || tag.text != "storage")
            fail("persistent id of kind " + (tag.kind == pickle_kind::string ? "'" + tag.text + "'" : describe(p.items[0])) +
                 " is not supported");
        if (p.items.size() != 5 && p.items.size() != 6)
            fail("storage persistent id has " + std::to_string(p.items.size()) + " fields, expected 5 or 6");
        const auto items = p.items;
        const auto& type = values_[items[1]];
        if (type.kind != pickle_kind::global || type.global != pickle_global::storage_type)
            fail("storage type is " + describe(items[1]));
        pickle_value v;
        v.kind = pickle_kind::storage;
        v.storage.type = type.storage_type;
        v.storage.key = need(items[2], pickle_kind::string, "storage key").text;
        if (values_[items[3]].kind == pickle_kind::string) v.storage.location = values_[items[3]].text;
        v.storage.numel = need_int(items[4], "storage size");
        if (v.storage.numel < 0) fail("storage size " + std::to_string(v.storage.numel) + " is negative");
        if (items.size() == 6 && values_[items[5]].kind != pickle_kind::none) {
            // Legacy storage views: (view_key, offset, size) within the root storage.
            const auto& view = values_[items[5]];
            if (view.kind != pickle_kind::tuple || view.items.size() != 3) fail("storage view metadata is " + describe(items[5]));
            const auto vi = view.items;
            const auto offset = need_int(vi[1], "storage view offset");
            const auto size = need_int(vi[2], "storage view size");
            if (offset < 0 || size < 0 || offset > v.storage.numel || size > v.storage.numel - offset)
                fail("storage view [" + std::to_string(offset) + ", +" + std::to_string(size) + ") lies outside storage '" +
                     v.storage.key + "' of " + std::to_string(v.storage.numel) + " elements");
            v.storage.root_numel = v.storage.numel;
            v.storage.offset = offset;
            v.storage.numel = size;
        }
        return make(std::move(v));
    }

    // ---- the interpreter ----------------------------------------------------------
    void step(std::uint8_t op, std::size_t at) {
        switch (op) {
            case 0x80: {  // PROTO
                const auto v = static_cast<unsigned>(read_byte());
                if (v > 5) fail_at(at, "pickle protocol " + std::to_string(v) + " is not supported");
                return;
            }
            case 0x95: take(8); return;  // FRAME: a hint for buffered readers
            case '(': marks_.push_back(stack_.size()); if (marks_.size() > limits_.max_stack) fail_at(at, "too many MARKs"); return;
            case '0': pop(); return;                   // POP
            case '1': pop_mark(); return;              // POP_MARK
            case '2': push(top()); return;             // DUP
            case 'N': push(make_kind(pickle_kind::none)); return;
            case 0x88: case 0x89: {                    // NEWTRUE, NEWFALSE
                pickle_value v;
                v.kind = pickle_kind::boolean;
                v.flag = op == 0x88;
                push(make(std::move(v)));
                return;
            }
            case 'J': push(make_int(read_le<std::int32_t>())); return;   // BININT
            case 'K': push(make_int(read_le<std::uint8_t>())); return;   // BININT1
            case 'M': push(make_int(read_le<std::uint16_t>())); return;  // BININT2
            case 0x8a: push(make_long(take(read_le<std::uint8_t>()))); return;  // LONG1
            case 0x8b: {                                                        // LONG4
                const auto n = read_le<std::int32_t>();
                if (n < 0) fail_at(at, "LONG4 with a negative length");
                push(make_long(take(static_cast<std::uint64_t>(n))));
                return;
            }
            case 'G': {  // BINFLOAT: big-endian IEEE double
                const auto b = take(8);
                std::uint64_t u = 0;
                for (int i = 0; i < 8; ++i) u = (u << 8) | static_cast<std::uint64_t>(b[static_cast<std::size_t>(i)]);
                pickle_value v;
                v.kind = pickle_kind::floating;
                v.real = std::bit_cast<double>(u);
                push(make(std::move(v)));
                return;
            }
            case 'X': push(make_text(pickle_kind::string, read_string(read_le<std::uint32_t>()))); return;    // BINUNICODE
            case 0x8c: push(make_text(pickle_kind::string, read_string(read_le<std::uint8_t>()))); return;    // SHORT_BINUNICODE
            case 0x8d: push(make_text(pickle_kind::string, read_string(read_le<std::uint64_t>()))); return;   // BINUNICODE8
            case 'T': push(make_text(pickle_kind::string, read_string(read_le<std::uint32_t>()))); return;    // BINSTRING
            case 'U': push(make_text(pickle_kind::string, read_string(read_le<std::uint8_t>()))); return;     // SHORT_BINSTRING
            case 'B': push(make_text(pickle_kind::bytes, read_string(read_le<std::uint32_t>()))); return;     // BINBYTES
            case 'C': push(make_text(pickle_kind::bytes, read_string(read_le<std::uint8_t>()))); return;      // SHORT_BINBYTES
            case 0x8e: case 0x96: push(make_text(pickle_kind::bytes, read_string(read_le<std::uint64_t>()))); return;  // BINBYTES8, BYTEARRAY8
            case ')': push(make_tuple({})); return;  // EMPTY_TUPLE
            case 't': push(make_tuple(pop_mark())); return;  // TUPLE
            case 0x85: case 0x86: case 0x87: {  // TUPLE1..3
                const std::size_t n = op - 0x84u;
                std::vector<std::uint32_t> items(n);
                for (std::size_t i = n; i-- > 0;) items[i] = pop();
                push(make_tuple(std::move(items)));
                return;
            }
            case ']': push(make_kind(pickle_kind::list)); return;  // EMPTY_LIST
            case 'l': {                                            // LIST
                pickle_value v;
                v.kind = pickle_kind::list;
                v.items = pop_mark();
                push(make(std::move(v)));
                return;
            }
            case '}': push(make_kind(pickle_kind::dict)); return;  // EMPTY_DICT
            case 'd': {                                            // DICT
                auto items = pop_mark();
                if (items.size() % 2) fail_at(at, "DICT with an odd number of items");
                pickle_value v;
                v.kind = pickle_kind::dict;
                v.items = std::move(items);
                push(make(std::move(v)));
                return;
            }
            case 'a': {  // APPEND
                const auto item = pop();
                append_to(top(), {item}, at);
                return;
            }
            case 'e': {  // APPENDS
                auto items = pop_mark();
                append_to(top(), items, at);
                return;
            }
            case 's': {  // SETITEM
                const auto v = pop();
                const auto k = pop();
                set_items(top(), {k, v}, at);
                return;
            }
            case 'u': {  // SETITEMS
                auto items = pop_mark();
                if (items.size() % 2) fail_at(at, "SETITEMS with an odd number of items");
                set_items(top(), items, at);
                return;
            }
            case 'q': memo_put(read_le<std::uint8_t>()); return;   // BINPUT
            case 'r': memo_put(read_le<std::uint32_t>()); return;  // LONG_BINPUT
            case 0x94: memo_put(static_cast<std::uint32_t>(memo_.size())); return;  // MEMOIZE
            case 'h': memo_get(read_le<std::uint8_t>()); return;   // BINGET
            case 'j': memo_get(read_le<std::uint32_t>()); return;  // LONG_BINGET
            case 'c': {  // GLOBAL
                const auto module = read_line();
                const auto name = read_line();
                push(resolve_global(module, name));
                return;
            }
            case 0x93: {  // STACK_GLOBAL
                const auto name = pop();
                const auto module = pop();
                if (values_[name].kind != pickle_kind::string || values_[module].kind != pickle_kind::string)
                    fail_at(at, "STACK_GLOBAL operands are not strings");
                push(resolve_global(values_[module].text, values_[name].text));
                return;
            }
            case 'R': {  // REDUCE
                const auto args = pop();
                const auto callable = pop();
                push(apply(callable, args));
                return;
            }
            case 0x81: {  // NEWOBJ: cls.__new__(cls, *args)
                const auto args = pop();
                const auto cls = pop();
                const auto& c = values_[cls];
                if (c.kind != pickle_kind::global || c.global != pickle_global::ordered_dict)
                    fail_at(at, "refusing to instantiate " + describe(cls));
                push(apply(cls, args));
                return;
            }
            case 'b': {  // BUILD: state applied to the object below it
                const auto state = pop();
                const auto target = top();
                // A state dict's OrderedDict carries `_metadata` (module versions)
                // as instance state: accepted and ignored. Anything else would
                // need Python semantics.
                if (values_[target].kind == pickle_kind::dict &&
                    (values_[state].kind == pickle_kind::dict || values_[state].kind == pickle_kind::none ||
                     values_[state].kind == pickle_kind::tuple))
                    return;
                fail_at(at, "BUILD of " + describe(target) + " with " + describe(state) + " is not supported");
            }
            case 'Q': {  // BINPERSID
                const auto pid = pop();
                push(persistent_load(pid));
                return;
            }
            case 'P': fail_at(at, "text persistent ids (PERSID) are not supported");
            case 'i': fail_at(at, "refusing opcode INST (instantiates an arbitrary class)");
            case 'o': fail_at(at, "refusing opcode OBJ (instantiates an arbitrary class)");
            case 0x92: fail_at(at, "refusing opcode NEWOBJ_EX (instantiates an arbitrary class)");
            case 0x82: case 0x83: case 0x84: fail_at(at, "refusing extension-registry opcode EXT (resolves a global by number)");
            case 0x97: case 0x98: fail_at(at, "out-of-band buffers (NEXT_BUFFER/READONLY_BUFFER) are not supported");
            case 0x8f: case 0x90: case 0x91: fail_at(at, "sets are not supported in checkpoints");
            case 'I': case 'L': case 'F': case 'S': case 'V': case 'p': case 'g':
                fail_at(at, std::string("text-protocol opcode '") + static_cast<char>(op) + "' is not supported (torch writes binary pickles)");
            default: {
                static constexpr char hex[] = "0123456789abcdef";
                fail_at(at, std::string("unknown pickle opcode 0x") + hex[op >> 4] + hex[op & 15]);
            }
        }
    }

    void append_to(std::uint32_t list, const std::vector<std::uint32_t>& items, std::size_t at) {
        if (values_[list].kind != pickle_kind::list) fail_at(at, "APPEND to " + describe(list));
        auto& dst = mut(list).items;
        dst.insert(dst.end(), items.begin(), items.end());
    }

    void set_items(std::uint32_t dict, const std::vector<std::uint32_t>& kv, std::size_t at) {
        if (values_[dict].kind != pickle_kind::dict) fail_at(at, "SETITEM on " + describe(dict));
        // Pairs are kept in order; a repeated key (which pickled dicts never
        // hold) is resolved by the consumer, later pair winning as in Python.
        auto& items = mut(dict).items;
        items.insert(items.end(), kv.begin(), kv.end());
    }

    std::string source_;
    pickle_limits limits_;
    std::span<const std::byte> data_;
    std::size_t pos_ = 0;
    std::vector<pickle_value> values_;
    std::vector<std::uint32_t> stack_;
    std::vector<std::size_t> marks_;
    std::unordered_map<std::uint64_t, std::uint32_t> memo_;
    std::uint32_t result_ = 0;
};

}  // namespace dynamicid::io::detail
