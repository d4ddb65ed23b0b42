#!/usr/bin/env bash
# Trains the built-in default model (docs/default_model.md) from scratch with
# dynamicid's own trainers, in the paper's order:
#
#   1. id      the identity encoder (IResNet + ArcFace margin) on the face world's identities
#   2. world   the training set: single-person world pictures with captions, face prompts,
#              106 landmarks and the identity encoder's embeddings
#   3. init    random frozen text encoder and image-feature encoder
#   4. vae     the VAE, then its latent scaling factor measured on the training set
#   5. unet    the UNet on the frozen text encoder and VAE
#   6. anchor  the anchoring stage (projection + SAA processors), single-person pictures
#   7. imr     the reconfiguration stage (IMR + KeyPointEncoder)
#   8. eval    the evaluation's classifiers (expression, yaw, pitch, accessories, background)
#   9. export  the shipped folder (weights in f16 where they are large)
#
# Usage: tools/default_model/train.sh [WORK_DIR] [OUT_DIR]
#   WORK_DIR  checkpoints and data (default: default-model-work); rerun to resume
#   OUT_DIR   the finished model (default: data/default_model)
# Environment: DYNAMICID (the CLI, default build/examples/generate/dynamicid),
#   THREADS (default: all cores), SCALE (multiplies every stage's steps, default 1),
#   BACKEND (onednn or cpu: the backend of the vae, unet, anchor and imr stages;
#   default onednn, 1.6-3.6x faster per step than the reference backend cpu,
#   with results that differ in the last bits; docs/default_model.md says
#   which backend trained which part of the shipped weights).
# Every stage resumes from its newest checkpoint; a finished stage is skipped.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
work="$(realpath -m "${1:-default-model-work}")"
out="$(realpath -m "${2:-$root/data/default_model}")"
cli="$(realpath -m "${DYNAMICID:-$root/build/examples/generate/dynamicid}")"
threads="${THREADS:-0}"
scale="${SCALE:-1}"
backend="${BACKEND:-onednn}"
[[ -x "$cli" ]] || { echo "train.sh: no dynamicid CLI at $cli (build the dynamicid_cli target or set DYNAMICID)" >&2; exit 1; }

mkdir -p "$work"
cd "$work"
if [[ ! -d model ]]; then
    cp -r "$here/model" model
    cp -r "$root/tests/data/tiny_sd/diffusers/tokenizer" model/tokenizer  # SD1.5's CLIP tokenizer files
fi
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a timings.log; }

# A config with its "steps" multiplied by $2.
scale_steps() {
    awk -v s="$2" '{
        if (match($0, /"steps": [0-9]+/)) { n = substr($0, RSTART + 9, RLENGTH - 9); v = int(n * s + 0.5); if (v < 1) v = 1;
            $0 = substr($0, 1, RSTART - 1) "\"steps\": " v substr($0, RSTART + RLENGTH) }
        print }' "$1"
}
# A stage's config with its steps scaled by SCALE, into the work folder.
config() { scale_steps "$here/configs/$1.json" "$scale" > "$1.json"; }

# Runs a stage unless its marker exists; $1 = name, rest = command.
stage() {
    local name="$1"
    shift
    if [[ -f "done.$name" ]]; then log "$name: done before, skipped"; return; fi
    log "$name: start"
    local t0=$SECONDS
    "$@"
    echo $((SECONDS - t0)) > "done.$name"
    log "$name: finished in $((SECONDS - t0)) s"
}

newest() { ls -d "$1"/checkpoint-* | sort | tail -n 1; }

stage_id() {
    config id
    "$cli" train id --config id.json --threads "$threads"
    cp "$(newest id)/face_id_net.safetensors" model/face_id_net.safetensors
}
stage_world() {
    rm -rf world
    "$cli" world render --out world --identities 400 --per-identity 6 --size 64 --seed 11 --id-net model/face_id_net.safetensors
}
stage_init() {
    "$cli" train init model/text_encoder --seed 21
    "$cli" train init model/image_encoder --seed 22
}
stage_vae() {
    config vae
    "$cli" train base --config vae.json --threads "$threads" --backend "$backend"
    rm -rf model/vae && cp -r "$(newest vae)/vae" model/vae
    "$cli" train scale model --manifest world/train.jsonl --images 512
}
stage_unet() {
    config unet
    "$cli" train base --config unet.json --threads "$threads" --backend "$backend"
    rm -rf model/unet && cp -r "$(newest unet)/unet" model/unet
}
stage_anchor() {
    config anchor
    "$cli" train anchor --config anchor.json --threads "$threads" --backend "$backend"
    cp "$(newest anchor)/SAA.safetensors" model/SAA.safetensors
}
stage_imr() {
    config imr
    "$cli" train imr --config imr.json --threads "$threads" --backend "$backend"
    cp "$(newest imr)/IMR.safetensors" model/IMR.safetensors
    cp "$(newest imr)/key_point_encoder.safetensors" model/key_point_encoder.safetensors
}
stage_eval() {
    local t
    for t in expression yaw pitch accessories background; do
        sed -e "s/\"target\": \"[a-z]*\"/\"target\": \"$t\"/" -e "s/\"output_dir\": \"[a-z_]*\"/\"output_dir\": \"classifier_$t\"/" \
            "$here/configs/classifier.json" > "classifier_$t.src.json"
        scale_steps "classifier_$t.src.json" "$scale" > "classifier_$t.json"
        "$cli" train id --config "classifier_$t.json" --threads "$threads"
        mkdir -p "model/eval/$t"
        cp "$(newest "classifier_$t")"/{face_id_net,trainer_state}.safetensors "model/eval/$t/"
    done
}
stage_export() {
    "$cli" train export model "$out"
}

stage id stage_id
stage world stage_world
stage init stage_init
stage vae stage_vae
stage unet stage_unet
stage anchor stage_anchor
stage imr stage_imr
stage eval stage_eval
stage export stage_export
log "the default model is in $out (stage times in $work/timings.log)"
