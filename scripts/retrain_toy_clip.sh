#!/usr/bin/env bash
# Retrain the committed toy CLIP (anim_lab/assets/toy_clip, toy_image_encoder) from scratch: the four stages
# documented in scripts/train_toy_clip.py, one CPU thread, seed 0. Resumable: a finished stage is skipped
# (runs/toy_clip/stageN.done), an interrupted one continues from its <out>.state.safetensors (+ .json). Run from the repository
# root:  nohup scripts/retrain_toy_clip.sh > runs/toy_clip.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
R=runs/toy_clip
mkdir -p "$R"
stage() {  # stage N args...
    local n=$1
    shift
    if [ -f "$R/stage$n.done" ]; then echo "stage $n: done already"; return; fi
    echo "stage $n: $*"
    "$PY" scripts/train_toy_clip.py "$@"
    touch "$R/stage$n.done"
}
stage 1 --resize 128 --max-steps 1830 --out $R/stage1 --encoder-out none
stage 2 --resize 128 --init $R/stage1 --max-steps 1333 --lr 5e-4 --aux-weight 4 --out $R/stage2 --encoder-out none
stage 3 --init $R/stage2 --max-steps 1171 --lr 5e-4 --aux-weight 4 --mouth-weight 2 --eval-identities 60 \
    --out $R/stage3 --encoder-out none
stage 4 --init $R/stage3 --max-steps 1302 --lr 3e-4 --aux-weight 4 --mouth-weight 2 --identity-weight 0.5 \
    --any-pairs
