// dynamicid CLI: the `train` subcommand.
//
//   dynamicid train init model/text_encoder --seed 1   (random weights from config.json)
//   dynamicid train base --config vae.json             (then unet.json: a base model from scratch)
//   dynamicid train anchor --config anchor.json
//   dynamicid train imr --config imr.json
//
// The JSON config holds the model paths, the manifest, the output folder and
// the hyperparameters (training::base_trainer_config,
// training::anchor_trainer_config / training::imr_trainer_config, keys as documented in docs/training.md). A
// progress bar with the loss and samples/s goes to stderr; the CSV log and the
// checkpoints go to the output folder. Ctrl-C stops after the current step and
// writes a checkpoint that "resume": "latest" continues from.
#pragma once

namespace dynamicid_cli {

/// `dynamicid train ...` with argv[0] == "train"; returns the exit code.
int run_train_command(int argc, char** argv);

}  // namespace dynamicid_cli
