#!/usr/bin/env bash
# The checks that only a CUDA machine can run, in one go, each stage with its own time limit:
#   1. the whole test suite on the GPU (the `gpu`-marked tests run instead of skipping; every
#      in-process training test then trains on CUDA);
#   2. paper-scale throughput and peak memory of the real training script: the VOC R50 CPS+CutMix
#      preset (crop 512, global batch 8 labeled + 2x8 unlabeled, random init) on synthetic 512-640 px
#      scenes, in fp32 and in bf16, 40 steps each (the last 10-step window is the steady state);
#   3. benchmarks/step_efficiency.py on CUDA (step time over the network passes it needs);
#   4. the demo (configs/demo.yaml) in bf16 on the GPU, for its final mIoU;
#   5. benchmarks/gpu_speed.py: CPS+CutMix R50 at 512 and UniMatch V2 DINOv2-S at 518 in fp32, bf16,
#      bf16 + channels_last and bf16 + torch.compile, each as a ratio to fp32 (~5 min);
#   6. benchmarks/peer_step.py on CUDA against the reference code, when UNIMATCH (and TORCHSEMISEG)
#      name clones of LiheYoung/UniMatch (and charlesCXK/TorchSemiSeg).
# Usage: bash benchmarks/gpu_check.sh OUT_DIR      (PYTHON=... to pick the interpreter)
# All stages take ~16 min, more than one 10-minute device call: STAGES picks some, e.g.
#   STAGES="gpu_speed peer" UNIMATCH=outputs/peers/UniMatch bash benchmarks/gpu_check.sh OUT_DIR
# OUT_DIR gets summary.txt plus one log per stage. gpu_speed and peer import only torch, timm, transformers,
# accelerate and yaml (no datasets/evaluate), so they run from the checkout (PYTHONPATH=.) on an image that
# has those; the other stages need the package's full dependencies.
set -u
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
PY=${PYTHON:-python3}
STAGES=${STAGES:-"tests r50 step_efficiency demo gpu_speed peer"}
want() { [[ " $STAGES " == *" $1 "* ]]; }
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d)

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, note rc and time
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc in $(($(date +%s) - start)) s" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/$name.log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, torchvision, timm, transformers, accelerate, datasets, evaluate, huggingface_hub as h
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, 'timm', timm.__version__)
print('transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__,
      'evaluate', evaluate.__version__, 'huggingface_hub', h.__version__)"
} 2>&1 | tee "$OUT/summary.txt"

want tests && stage tests 170 "$PY" -m pytest -q -p no:cacheprovider -n 4 tests

want r50 && "$PY" scripts/make_demo_data.py --out "$WORK/data512" --num_train 48 --num_val 4 --min_size 512 --max_size 640 >/dev/null
for precision in $(want r50 && echo no bf16); do
  stage "r50_$precision" 110 "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 \
    --mixed_precision "$precision" --dynamo_backend no scripts/train_cps.py \
    --config configs/voc_r50_1-8_cps_cutmix.yaml --data_root "$WORK/data512" --labeled 8 \
    --pretrained_backbone none --max_train_steps 40 --logging_steps 10 --eval_steps none \
    --checkpointing_steps none --global_batch_size 8 --num_workers 5 --report_to none \
    --mixed_precision "$precision" --output_dir "$WORK/r50_$precision"
  grep '"loss"' "$WORK/r50_$precision/log.jsonl" >"$OUT/r50_$precision.jsonl" 2>/dev/null
  "$PY" - "$WORK/r50_$precision/log.jsonl" "$precision" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
try:
    records = [json.loads(line) for line in open(sys.argv[1]) if '"loss"' in line]
    last = records[-1]
    print(f"R50 CPS+CutMix 512 crop, batch 8+16, precision {sys.argv[2]}: step {last['step']}, "
          f"{last['images_per_second']:.1f} images/s, peak {last['max_memory_allocated_gib']:.1f} GiB, loss {last['loss']:.3f}")
except Exception as error:  # the stage log says why
    print(f"precision {sys.argv[2]}: no log ({error!r})")
EOF
done

if want step_efficiency; then
  stage step_efficiency 80 "$PY" benchmarks/step_efficiency.py --device cuda --backbone resnet50 --crop 512 --batch 8 \
    --repeats 5 --warmup 2
  tail -n 1 "$OUT/step_efficiency.log" >>"$OUT/summary.txt"
fi

if want demo; then
  "$PY" scripts/make_demo_data.py --out "$WORK/demo_data" >/dev/null
  stage demo_bf16 90 "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 \
    --dynamo_backend no scripts/train_cps.py --config configs/demo.yaml --data_root "$WORK/demo_data" \
    --mixed_precision bf16 --report_to none --output_dir "$WORK/demo_bf16"
  grep -h "final eval_mean_iou" "$OUT/demo_bf16.log" >>"$OUT/summary.txt"
fi

if want gpu_speed; then
  stage gpu_speed 420 "$PY" benchmarks/gpu_speed.py --device cuda
  grep -h "x fp32 images/s" "$OUT/gpu_speed.log" >>"$OUT/summary.txt"
fi

if want peer && [ -n "${UNIMATCH:-}" ]; then
  stage peer_step 150 "$PY" benchmarks/peer_step.py --device cuda --crop 321 --batch 8 --repeats 5 \
    --unimatch_path "$UNIMATCH" ${TORCHSEMISEG:+--torchsemiseg_path "$TORCHSEMISEG"}
  tail -n 4 "$OUT/peer_step.log" >>"$OUT/summary.txt"
fi
rm -rf "$WORK"
