// dynamicid io: DynamicID's SAA checkpoint (and IP-Adapter-FaceID-Plus's) as
// weight sources for the identity projection and the attention processors.
//
// Layouts read (torch.save files, or safetensors files whose keys are the
// same tree flattened with "."):
//
//   DynamicID SAA.bin                        IP-Adapter-FaceID-Plus / PlusV2 (SD1.5)
//   {"proj_module": ProjPlusModel sd,        {"image_proj": ProjPlusModel sd,
//    "SAA_module":  ModuleList sd}            "ip_adapter": ModuleList sd}
//
// Both ModuleLists hold one processor per attention layer, indexed in
// diffusers' `UNet2DConditionModel.attn_processors` order (down blocks, up
// blocks, then the mid block; even = attn1, odd = attn2):
//
//   <i>.to_q_lora.down.weight (rank, hidden)   <i>.to_q_lora.up.weight (hidden, rank)
//   <i>.to_k_lora.* / <i>.to_v_lora.*          (input width: hidden for attn1, context for attn2)
//   <i>.to_out_lora.*
//   <i>.to_k_ip.weight, <i>.to_v_ip.weight     (hidden, context), attn2 only
//
// What differs between the two (beyond the key names):
// - IP-Adapter-FaceID-Plus attends to the identity tokens with plain
//   attention: it is the SAA processor with gating off (activate_query =
//   false: w' = 1, no box masks, no layout boost); the DynamicID default is
//   gating on.
// - PlusV2 uses ProjPlusModel's shortcut (tokens + s_scale * resampler
//   output, s_scale 1.0 by default); DynamicID and Plus (v1) use the
//   resampler output alone. `identity_checkpoint::shortcut` says which.
// - IP-Adapter-FaceID feeds CLIP the aligned 224x224 face crop
//   (insightface's norm_crop), DynamicID the whole reference image: the
//   caller chooses the image it passes.
// - LoRA rank is 128 in both releases; it is read from the weights.
//
//     auto ckpt = dynamicid::io::identity_checkpoint::open("SAA.bin");
//     auto proj = ckpt.load_projection<dynamicid::cpu_backend>(ctx, {});          // ProjPlusModel
//     dynamicid::modules::weight_binder<dynamicid::cpu_backend, float> b(ctx, ckpt.processors);
//     auto down = b.scope("3").tensor("to_k_ip.weight", {320, 768});
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/io/torch_checkpoint.hpp>
#include <dynamicid/modules/identity/proj_plus.hpp>
#include <dynamicid/modules/weights.hpp>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dynamicid::io {

/// Which release a checkpoint follows.
enum class identity_checkpoint_layout {
    dynamicid,               ///< proj_module / SAA_module
    ip_adapter_faceid_plus,  ///< image_proj / ip_adapter (FaceID-Plus and PlusV2)
};

/// The two halves of an SAA-style checkpoint as weight sources.
struct identity_checkpoint {
    identity_checkpoint_layout layout = identity_checkpoint_layout::dynamicid;
    /// ProjPlusModel keys ("proj.0.weight", "perceiver_resampler.layers.0.0.to_q.weight", ...)
    /// stored in `projection_file` under `projection_prefix`.
    std::shared_ptr<const safetensors_file> projection_file;
    std::string projection_prefix;
    /// Processor keys "<index>.to_q_lora.down.weight", ... (a key translation adds any prefix).
    modules::weight_source processors;
    /// Processor indices present (sorted).
    std::vector<index_t> processor_indices;
    /// True for IP-Adapter-FaceID-PlusV2's shortcut projection (set by the caller;
    /// the file does not say so).
    bool shortcut = false;
    std::string source;

    /// Opens a .bin/.pt/.pth (torch.save) or a .safetensors file; io_error when
    /// neither layout's two entries are present.
    static identity_checkpoint open(const std::filesystem::path& path) {
        std::string ext = path.extension().string();
        std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
        if (ext == ".safetensors")
            return from_safetensors(std::make_shared<const safetensors_file>(safetensors_file::open(path)));
        return from_torch(torch_checkpoint::open(path));
    }

    /// From a parsed torch.save file.
    static identity_checkpoint from_torch(const torch_checkpoint& ckpt) {
        const auto& root = ckpt.root();
        check<io_error>(root.is_dict(), "dynamicid_checkpoint", ckpt.source(), ": the top level is a ", root.kind_name(), ", not a dict");
        const auto [proj_key, proc_key, layout] = detect(
            [&](std::string_view k) { return root.find(k) != nullptr; }, ckpt.source());
        identity_checkpoint c;
        c.layout = layout;
        c.source = ckpt.source();
        const auto proj = torch_weight_source(ckpt, proj_key);
        c.projection_file = proj.files().front();
        c.processors = torch_weight_source(ckpt, proc_key);
        c.processor_indices = collect_indices(c.processors.stored_keys(), "");
        return c;
    }

    /// From a safetensors file holding the flattened tree ("proj_module.proj.0.weight", ...).
    static identity_checkpoint from_safetensors(std::shared_ptr<const safetensors_file> file) {
        const auto names = file->names();
        const auto has_prefix = [&](std::string_view k) {
            const std::string p = std::string(k) + ".";
            return std::any_of(names.begin(), names.end(), [&](const std::string& n) { return n.rfind(p, 0) == 0; });
        };
        const auto [proj_key, proc_key, layout] = detect(has_prefix, file->source());
        identity_checkpoint c;
        c.layout = layout;
        c.source = file->source();
        c.projection_file = file;
        c.projection_prefix = std::string(proj_key) + ".";
        const std::string proc_prefix = std::string(proc_key) + ".";
        c.processors = modules::weight_source({file}, [proc_prefix](std::string_view k) { return proc_prefix + std::string(k); });
        c.processor_indices = collect_indices(names, proc_prefix);
        return c;
    }

    /// Number of processors (largest index + 1; 0 when none).
    index_t processor_count() const noexcept { return processor_indices.empty() ? 0 : processor_indices.back() + 1; }

    /// The ProjPlusModel of the checkpoint.
    template <class B, class T = float>
        requires computes_in<B, T>
    modules::identity::proj_plus_model<B, T> load_projection(context_t<B>& ctx, const modules::identity::proj_plus_config& cfg) const {
        check<value_error>(projection_file != nullptr, "dynamicid_checkpoint", "no projection weights");
        return modules::identity::proj_plus_model<B, T>::load(ctx, *projection_file, cfg, projection_prefix);
    }

    /// The projection's sizes read from its weights (cross_attention_dim,
    /// id_embeddings_dim, clip_embeddings_dim, num_tokens, depth); heads and
    /// dim_head follow the release (dim_head 64, heads = width / 64).
    modules::identity::proj_plus_config projection_config() const {
        check<value_error>(projection_file != nullptr, "dynamicid_checkpoint", "no projection weights");
        const auto& f = *projection_file;
        const auto dims = [&](const std::string& key) {
            check<io_error>(f.contains(projection_prefix + key), "dynamicid_checkpoint", source, ": missing '", projection_prefix + key, "'");
            return f.info(projection_prefix + key).dims;
        };
        modules::identity::proj_plus_config c;
        const auto norm = dims("norm.weight"), p0 = dims("proj.0.weight"), p2 = dims("proj.2.weight"),
                   pin = dims("perceiver_resampler.proj_in.weight");
        check<io_error>(norm.rank() == 1 && p0.rank() == 2 && p2.rank() == 2 && pin.rank() == 2 && norm[0] > 0 && p2[0] % norm[0] == 0,
                        "dynamicid_checkpoint", source, ": the projection's weights do not form a ProjPlusModel");
        c.cross_attention_dim = norm[0];
        c.id_embeddings_dim = p0[1];
        c.num_tokens = p2[0] / norm[0];
        c.clip_embeddings_dim = pin[1];
        c.dim_head = 64;
        c.heads = std::max<index_t>(1, c.cross_attention_dim / 64);
        index_t depth = 0;
        while (f.contains(projection_prefix + "perceiver_resampler.layers." + std::to_string(depth) + ".0.to_q.weight")) ++depth;
        c.depth = depth;
        const std::string ff = projection_prefix + "perceiver_resampler.layers.0.1.1.weight";
        if (f.contains(ff) && f.info(ff).dims.rank() == 2 && c.cross_attention_dim > 0)
            c.ff_mult = f.info(ff).dims[0] / c.cross_attention_dim;
        return c;
    }

private:
    struct layout_keys {
        std::string_view projection, processors;
        identity_checkpoint_layout layout;
    };

    template <class Has>
    static layout_keys detect(const Has& has, const std::string& source) {
        if (has("proj_module") && has("SAA_module")) return {"proj_module", "SAA_module", identity_checkpoint_layout::dynamicid};
        if (has("image_proj") && has("ip_adapter")) return {"image_proj", "ip_adapter", identity_checkpoint_layout::ip_adapter_faceid_plus};
        throw io_error("dynamicid_checkpoint", source +
                                                   ": neither DynamicID's {proj_module, SAA_module} nor IP-Adapter-FaceID's "
                                                   "{image_proj, ip_adapter} entries are present");
    }

    /// The leading integers of keys "<prefix><i>.<rest>".
    static std::vector<index_t> collect_indices(const std::vector<std::string>& names, const std::string& prefix) {
        std::set<index_t> found;
        for (const auto& n : names) {
            if (n.rfind(prefix, 0) != 0) continue;
            const auto rest = std::string_view(n).substr(prefix.size());
            const auto dot = rest.find('.');
            if (dot == 0 || dot == std::string_view::npos) continue;
            index_t v = 0;
            bool digits = true;
            for (char ch : rest.substr(0, dot)) {
                if (ch < '0' || ch > '9') { digits = false; break; }
                v = v * 10 + (ch - '0');
            }
            if (digits) found.insert(v);
        }
        return {found.begin(), found.end()};
    }
};

}  // namespace dynamicid::io
