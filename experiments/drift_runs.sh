#!/usr/bin/env bash
# experiments/drift_runs.sh -- a long teacher-forcing vs Resampling Forcing pair, on a CPU.
#
#   nohup bash experiments/drift_runs.sh > runs/drift.log 2>&1 &
#   STEPS=16000 nohup bash experiments/drift_runs.sh > runs/drift.log 2>&1 &     # extend both (rerun: it resumes)
#   DATA=runs/turning/train.npz OUT=runs/turning STEPS=12000 bash experiments/drift_runs.sh   # the turning toy
#   MODEL="--dim 128 --ffn_dim 512 --num_heads 4 --num_layers 2" OUT=runs/small STEPS=12000 \
#       bash experiments/drift_runs.sh                                     # the shipped small pair (0.69M)
#   S=0.3 OUT=runs/small_s0.3 MODEL=... bash experiments/drift_runs.sh   # RF at resampling shift s = 0.3 (new OUT)
#   python -c "from tiny_data import shapes; shapes.save_dataset('runs/long/train32.npz', shapes.make_dataset(0, 2000, 32))"
#   MODEL="--dim 128 --ffn_dim 512 --num_heads 4 --num_layers 2" DATA=runs/long/train32.npz CLIP=32 OUT=runs/long \
#       WARMUP=2000 STEPS=4000 bash experiments/drift_runs.sh      # 32-frame training clips, as long as the rollout
#
# One shared teacher-forcing warm-up (WARMUP steps, 2 threads), then two branches from its last checkpoint, side by
# side at 1 thread each, to STEPS in all: teacher forcing (--degrade none) and Resampling Forcing (autoregressive
# self-resampling, s = S, default 0.6). Same data, seed, batch and steps; only the history degradation differs.
# Every run checkpoints every 500 steps and resumes exactly, so rerunning the script (after a kill, or with a
# larger STEPS) goes on where it stopped. Evaluate with
#   python experiments/tune_toy.py $OUT/tf $OUT/rf --clips 64 --png $OUT/tf_vs_rf.png
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/drift}
WARMUP=${WARMUP:-3000}
STEPS=${STEPS:-9000}
COMMON=(--train_shift 3 --warmup_steps "$WARMUP" --batch_size 8 --clip_frames "${CLIP:-8}" --seed 0 --ckpt_every "${CKPT_EVERY:-500}"
        --keep_last "${KEEP:-2}" --no-sample)
[ -n "${DATA:-}" ] && COMMON+=(--data "$DATA")   # another .npz (experiments/turning_toy.py data writes one)
[ -n "${MODEL:-}" ] && COMMON+=($MODEL)           # model size, e.g. the small pair's "--dim 64 --ffn_dim 256 ..."
WARM_KEEP=(--keep_last 20)   # every warm-up checkpoint stays: the quick-start candidates are read from them

resume() { [ -e "$1/latest" ] && echo --resume || true; }

if [ ! -e "$OUT/warmup/step_$(printf %07d "$WARMUP")" ]; then
    echo "== warm-up: teacher forcing to step $WARMUP ($(date -u +%H:%M))"
    OMP_NUM_THREADS=2 python train.py --out "$OUT/warmup" --steps "$WARMUP" "${COMMON[@]}" "${WARM_KEEP[@]}" $(resume "$OUT/warmup")
fi
for b in tf rf; do
    if [ ! -e "$OUT/$b/latest" ]; then                 # branch: a copy of the warm-up's last checkpoint
        mkdir -p "$OUT/$b"
        cp -r "$OUT/warmup/step_$(printf %07d "$WARMUP")" "$OUT/$b/"
        ln -sfn "step_$(printf %07d "$WARMUP")" "$OUT/$b/latest"
    fi
done
echo "== branches to step $STEPS ($(date -u +%H:%M))"
OMP_NUM_THREADS=1 python train.py --out "$OUT/tf" --steps "$STEPS" "${COMMON[@]}" --resume \
    --degrade none > "$OUT/tf.log" 2>&1 &
TF=$!
OMP_NUM_THREADS=1 python train.py --out "$OUT/rf" --steps "$STEPS" "${COMMON[@]}" --resume \
    --degrade autoregressive --resample_shift "${S:-0.6}" > "$OUT/rf.log" 2>&1 &
RF=$!
wait $TF $RF
echo "== done ($(date -u +%H:%M)): python experiments/tune_toy.py $OUT/tf $OUT/rf --clips 64 --png $OUT/tf_vs_rf.png"
