// dynamicid visual: DynamicID's activation maps (the SAA gating weights) as
// heat maps.
//
// Every SAA layer computes, per denoising step, a weight per query (latent
// cell): the min-max normalised, thresholded activation (`normalized`, the
// released attn_maps) and the factor actually applied to the identity branch
// after the layout boost (`weights`). activation_recorder collects them
// through the pipeline's on_activation control; identity_map() cuts one
// identity's view out of a record (the cells of its box, where the other
// identities' tokens are masked: the summed activation is shared by all
// identities, the box says whose tokens a cell attends to); heat_map_rgb()
// renders a map; write_heat_maps() writes PNGs with stb_image_write (link
// Debian's libstb, or define STB_IMAGE_WRITE_IMPLEMENTATION in one file).
//
//     dynamicid::visual::activation_recorder rec({.layers = {15}});   // one layer, or all when empty
//     controls.on_activation = rec.callback();
//     auto out = pipe.generate(ctx, opts, ids, controls);
//     dynamicid::visual::write_heat_maps("maps", rec, boxes);         // maps/layer15_step000_id0.png ...
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/modules/dynamicid/saa.hpp>
#include <dynamicid/pipelines/detail/dynamicid_processors.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#if __has_include(<stb/stb_image_write.h>)
#include <stb/stb_image_write.h>
#define DYNAMICID_HAS_STB_IMAGE_WRITE 1
#endif

namespace dynamicid::visual {

/// One gating computation, copied out of the callback.
struct activation_entry {
    index_t layer = 0;
    std::string name;
    std::int64_t step = 0;
    index_t batch = 0;
    modules::saa::grid_shape grid;
    double beta = 0;
    std::vector<float> normalized;  ///< (batch, height, width)
    std::vector<float> weights;     ///< (batch, height, width)
};

/// Which map of a record.
enum class map_kind { normalized, weights };

/// What to keep.
struct activation_filter {
    std::set<index_t> layers{};        ///< processor indices; empty: all
    std::set<std::int64_t> steps{};    ///< steps; empty: all
};

/// Collects activation records (thread-safe; one recorder per generation).
class activation_recorder {
public:
    explicit activation_recorder(activation_filter filter = {}) : state_(std::make_shared<state>()) { state_->filter = std::move(filter); }

    /// The callback to put in dynamicid_controls::on_activation (shares this recorder's storage).
    std::function<void(const pipelines::dynamicid_activation_event&)> callback() const {
        return [s = state_](const pipelines::dynamicid_activation_event& e) {
            if (!s->filter.layers.empty() && !s->filter.layers.count(e.layer)) return;
            if (!s->filter.steps.empty() && !s->filter.steps.count(e.step)) return;
            activation_entry a{e.layer, std::string(e.name), e.step, e.record.batch, e.record.grid, e.record.beta, e.record.normalized,
                               e.record.weights};
            std::lock_guard lock(s->mutex);
            s->entries.push_back(std::move(a));
        };
    }

    const std::vector<activation_entry>& records() const noexcept { return state_->entries; }
    void clear() {
        std::lock_guard lock(state_->mutex);
        state_->entries.clear();
    }

private:
    struct state {
        activation_filter filter;
        std::mutex mutex;
        std::vector<activation_entry> entries;
    };
    std::shared_ptr<state> state_;
};

/// The (height x width) map of batch row `batch_index` (CFG: 0 = uncond, 1 = cond).
inline std::vector<float> map_of(const activation_entry& e, index_t batch_index, map_kind kind = map_kind::weights) {
    check<value_error>(batch_index >= 0 && batch_index < e.batch, "activation_maps", "batch index ", batch_index, " of ", e.batch);
    const auto& src = kind == map_kind::weights ? e.weights : e.normalized;
    const auto n = static_cast<std::size_t>(e.grid.height * e.grid.width);
    return {src.begin() + static_cast<std::ptrdiff_t>(n * static_cast<std::size_t>(batch_index)),
            src.begin() + static_cast<std::ptrdiff_t>(n * static_cast<std::size_t>(batch_index + 1))};
}

/// Identity `identity`'s view: the map inside its box (boxes as resolved for
/// the call; empty: vertical strips), zero elsewhere.
inline std::vector<float> identity_map(const activation_entry& e, index_t batch_index, const std::vector<modules::saa::box>& boxes,
                                       index_t identity, map_kind kind = map_kind::weights, index_t id_num = 0) {
    const auto resolved = modules::saa::resolve_boxes(boxes, std::max<index_t>(id_num, std::max<index_t>(identity + 1, static_cast<index_t>(boxes.size()))));
    check<value_error>(identity >= 0 && identity < static_cast<index_t>(resolved.size()), "activation_maps", "identity ", identity,
                       " has no box");
    const auto full = map_of(e, batch_index, kind);
    std::vector<float> out(full.size(), 0.f);
    const auto c = modules::saa::to_cells(resolved[static_cast<std::size_t>(identity)], e.grid);
    for (index_t y = c.y0; y < std::min(c.y1, e.grid.height); ++y)
        for (index_t x = c.x0; x < std::min(c.x1, e.grid.width); ++x) {
            const auto i = static_cast<std::size_t>(y * e.grid.width + x);
            out[i] = full[i];
        }
    return out;
}

/// RGB bytes (height*scale x width*scale x 3) of a map, black -> red -> yellow
/// -> white over [0, max] (max: the map's maximum when <= 0), nearest upscaling.
inline std::vector<std::uint8_t> heat_map_rgb(const std::vector<float>& map, modules::saa::grid_shape g, index_t scale = 8, double max = 0.0) {
    check<value_error>(scale >= 1, "activation_maps", "scale must be at least 1");
    check<shape_error>(static_cast<index_t>(map.size()) == g.height * g.width, "activation_maps", map.size(), " values for a ", g.height,
                       " x ", g.width, " grid");
    if (max <= 0.0)
        for (float v : map) max = std::max(max, static_cast<double>(v));
    const index_t h = g.height * scale, w = g.width * scale;
    std::vector<std::uint8_t> rgb(static_cast<std::size_t>(h * w * 3));
    const auto ramp = [](double t, double lo) { return static_cast<std::uint8_t>(std::lround(255.0 * std::clamp((t - lo) * 3.0, 0.0, 1.0))); };
    for (index_t y = 0; y < h; ++y)
        for (index_t x = 0; x < w; ++x) {
            const double v = map[static_cast<std::size_t>((y / scale) * g.width + x / scale)];
            const double t = max > 0.0 && std::isfinite(v) ? std::clamp(v / max, 0.0, 1.0) : 0.0;
            auto* p = &rgb[static_cast<std::size_t>((y * w + x) * 3)];
            p[0] = ramp(t, 0.0);
            p[1] = ramp(t, 1.0 / 3);
            p[2] = ramp(t, 2.0 / 3);
        }
    return rgb;
}

#ifdef DYNAMICID_HAS_STB_IMAGE_WRITE
/// Writes RGB bytes as a PNG; io_error when stb cannot.
inline void write_png(const std::filesystem::path& path, const std::vector<std::uint8_t>& rgb, index_t height, index_t width) {
    check<shape_error>(static_cast<index_t>(rgb.size()) == height * width * 3, "activation_maps", "image size mismatch");
    const int ok = stbi_write_png(path.string().c_str(), static_cast<int>(width), static_cast<int>(height), 3, rgb.data(),
                                  static_cast<int>(width * 3));
    check<io_error>(ok != 0, "activation_maps", "cannot write ", path.string());
}

/// One PNG per record and identity of the conditional batch row:
/// <dir>/layer<L>_step<SSS>_id<I>.png (identity views), plus
/// <dir>/layer<L>_step<SSS>_all.png (the whole map). Returns the files written.
inline std::vector<std::filesystem::path> write_heat_maps(const std::filesystem::path& dir, const activation_recorder& rec,
                                                          const std::vector<modules::saa::box>& boxes, index_t id_num = 0,
                                                          map_kind kind = map_kind::weights, index_t scale = 8) {
    std::filesystem::create_directories(dir);
    std::vector<std::filesystem::path> written;
    const index_t ids = std::max<index_t>(id_num, static_cast<index_t>(boxes.size()));
    for (const auto& e : rec.records()) {
        const index_t row = e.batch - 1;  // the conditional row (last) under CFG
        char stem[64];
        std::snprintf(stem, sizeof stem, "layer%lld_step%03lld", static_cast<long long>(e.layer), static_cast<long long>(e.step));
        const auto whole = map_of(e, row, kind);
        double max = 0.0;
        for (float v : whole) max = std::max(max, static_cast<double>(v));
        const auto put = [&](const std::vector<float>& m, const std::string& suffix) {
            auto path = dir / (std::string(stem) + suffix + ".png");
            write_png(path, heat_map_rgb(m, e.grid, scale, max), e.grid.height * scale, e.grid.width * scale);
            written.push_back(std::move(path));
        };
        put(whole, "_all");
        for (index_t i = 0; i < ids; ++i) put(identity_map(e, row, boxes, i, kind, ids), "_id" + std::to_string(i));
    }
    return written;
}
#endif

}  // namespace dynamicid::visual
