// dynamicid CLI: `dynamicid eval`, the default model's evaluation in the
// paper's spirit on held-out identities of the face world (docs/default_model.md).
#pragma once

namespace dynamicid_cli {

/// argv[0] is "eval". Returns the process exit code.
int run_eval_command(int argc, char** argv);

}  // namespace dynamicid_cli
