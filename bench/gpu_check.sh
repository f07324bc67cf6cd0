#!/usr/bin/env bash
# The GPU checks of issue 12, as one short script for a lent GPU machine (no registry there, its own Python).
# Prepare here first (models, clip and the pure-Python config dependencies the daemon modules import):
#   bench/gpu_check.sh --prepare        # fills build/gpu (~25 MB, git-ignored)
# then run it there with build/gpu carried, writing figures to $OUT:
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    py=.venv/bin/python
    rm -rf build/gpu && mkdir -p build/gpu/site build/gpu/wheels build/gpu/models
    .venv/bin/pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 pydantic pyyaml -d build/gpu/wheels
    for w in build/gpu/wheels/*.whl; do unzip -q -o "$w" -d build/gpu/site; done
    rm -rf build/gpu/wheels
    models=$($py -c "from agecam.config import DEFAULT_MODELS_DIR; print(DEFAULT_MODELS_DIR)")
    cp -r "$models/mtcnn" "$models/age" build/gpu/models/
    clip=$($py -c "import sys; sys.path.insert(0, 'bench'); from bench_peer import scene_clip; print(scene_clip()[0])")
    cp "$clip" build/gpu/scene.mp4
    du -sh build/gpu
    exit 0
fi
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
echo "== machine"; nvidia-smi -L; python3 -V; nproc
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_device(), o.get_available_providers())"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
export PYTHONPATH="$PWD/build/gpu/site:$PWD"
echo "== daemon detector + age model per provider"
timeout 150 python3 bench/bench_gpu_daemon.py --models build/gpu/models --clip build/gpu/scene.mp4 \
    --json "$OUT/daemon.json"
echo "== training loader vs synthetic (batch 256, 224 px, AMP, channels-last)"
timeout 240 python3 bench/bench_train_gpu.py --json "$OUT/train.json"
echo "== export: torch CUDA fp16 inference"
timeout 150 python3 bench/bench_export.py --gpu --json "$OUT/export.json"
echo "== done"
