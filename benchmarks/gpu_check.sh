#!/usr/bin/env bash
# The checks that need a GPU, in one short run (under 5 minutes on an H100/H200), for when one is lent:
#   1. the gpu-marked tests;
#   2. bench_pose2video.py --cuda: SD15 size, fp16, 512x512, 24 frames, 25 steps: s/step, peak memory and the
#      denoising UNet's achieved TFLOP/s against the card's bf16 peak;
#   3. the same call under enable_model_cpu_offload().
# Without a CUDA device it says so and runs nothing (exit 0: skipped, as pytest skips the gpu marker).
#
#   benchmarks/gpu_check.sh                      # results into results/gpu_*.json
#   benchmarks/gpu_check.sh --out /tmp/gpu       # elsewhere
#   benchmarks/gpu_check.sh --python venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
PY=.venv/bin/python
OUT=results
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --python) [ $# -ge 2 ] || { echo "gpu_check.sh: --python needs a path" >&2; exit 2; }; PY=$2; shift 2 ;;
        --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a folder" >&2; exit 2; }; OUT=$2; shift 2 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
if [ ! -x "$PY" ]; then
    echo "gpu_check.sh: no python at $PY; run 'make test' once (it creates .venv) or give --python" >&2
    exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: SKIPPED: torch sees no CUDA device; nothing was run"
    exit 0
fi
mkdir -p "$OUT"
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
echo "== 1/3 the gpu-marked tests"
"$PY" -m pytest -q -m gpu tests -p no:cacheprovider
echo "== 2/3 SD15 size, fp16, 512x512, 24 frames, 25 steps"
"$PY" benchmarks/bench_pose2video.py --cuda --json "$OUT/gpu_bench_pose2video.json"
echo "== 3/3 the same under enable_model_cpu_offload()"
"$PY" benchmarks/bench_pose2video.py --cuda --offload --json "$OUT/gpu_bench_pose2video_offload.json"
echo "gpu_check.sh: done; results in $OUT/"
