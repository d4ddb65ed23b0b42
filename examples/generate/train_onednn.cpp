// dynamicid CLI: `dynamicid train base|anchor|imr --backend onednn` (built
// when the oneDNN backend is; see train_runner.hpp).
#include "train_runner.hpp"

#include <dynamicid/backends/onednn.hpp>

#include <string>

namespace dynamicid_cli::detail {

int train_on_onednn(const std::string& stage, const nlohmann::json& j, int threads_override) {
    return run_stage<dynamicid::onednn_backend>(stage, j, threads_override);
}

}  // namespace dynamicid_cli::detail
