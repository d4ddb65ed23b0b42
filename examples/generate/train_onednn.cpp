// dynamicid CLI: `dynamicid train base|anchor|imr --backend onednn` (built
// when the oneDNN backend is; see train_runner.hpp).
#include "train_runner.hpp"

#include <dynamicid/backends/onednn.hpp>
#include <dynamicid/training/anchor_trainer.hpp>
#include <dynamicid/training/base_trainer.hpp>
#include <dynamicid/training/imr_trainer.hpp>

#include <string>

namespace dynamicid_cli::detail {

int train_on_onednn(const std::string& stage, const nlohmann::json& j, int threads_override) {
    namespace tr = dynamicid::training;
    using B = dynamicid::onednn_backend;
    if (stage == "anchor") return run_trainer<B, tr::anchor_trainer<B>, tr::anchor_trainer_config>(j, threads_override);
    if (stage == "base") return run_trainer<B, tr::base_trainer<B>, tr::base_trainer_config>(j, threads_override);
    return run_trainer<B, tr::imr_trainer<B>, tr::imr_trainer_config>(j, threads_override);
}

}  // namespace dynamicid_cli::detail
