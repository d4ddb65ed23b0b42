// dynamicid CLI: the `world` subcommand, the procedural face world of
// examples/world/face_world.hpp (docs/world.md).
//
//   dynamicid world render --out DIR --identities N --per-identity K [--size 64] [--seed S]
//                          [--two-person M] [--first-id ID]
//   dynamicid world show --id N [--expression happy] [--yaw left|front|right|DEGREES]
//                        [--pitch up|front|down|DEGREES] [--background beach] [--accessories hat]
//                        [--size 256] [--seed S] [--sample K] [--landmarks] [--out face.png]
//   dynamicid world sheet --out sheet.png [--mode identities|expressions|poses|two] [--size 64]
//                         [--cols 8] [--rows 8] [--first-id ID] [--seed S]
//
// `render` writes DIR/images/*.png and DIR/train.jsonl (one line per picture,
// readable by training::read_manifest once an "arcface" is added), plus
// DIR/two_person/*.png and DIR/two_person.jsonl with --two-person M.
#pragma once

namespace dynamicid_cli {

/// `dynamicid world ...` with argv[0] == "world"; returns the exit code.
int run_world_command(int argc, char** argv);

}  // namespace dynamicid_cli
