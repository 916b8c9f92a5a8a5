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
#   DATA=tiny_data/textured_train.npz SEED=1 WARM_THREADS=1 BRANCHES="tf rf na" WARMUP=6000 STEPS=9000 \
#       OUT=runs/textured/seed1 bash experiments/drift_runs.sh        # the textured toy, three branches (na: noise aug.)
#
# One shared teacher-forcing warm-up (WARMUP steps, WARM_THREADS threads, default 2), then branches from its last
# checkpoint, side by side at 1 thread each, to STEPS in all: teacher forcing (tf: --degrade none), Resampling Forcing
# (rf: autoregressive self-resampling, s = S, default 0.6) and, if BRANCHES names it, noise augmentation (na: history
# x_tau, tau ~ U(0, NA), default 0.1). Same data, seed (SEED, default 0), batch and steps; only the history differs.
# Every run checkpoints every 500 steps and resumes exactly, so rerunning the script (after a kill, or with a
# larger STEPS) goes on where it stopped. Evaluate with
#   python experiments/tune_toy.py $OUT/tf $OUT/rf --clips 64 --png $OUT/tf_vs_rf.png
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/drift}
WARMUP=${WARMUP:-3000}
STEPS=${STEPS:-9000}
COMMON=(--train_shift 3 --warmup_steps "$WARMUP" --batch_size 8 --clip_frames "${CLIP:-8}" --seed "${SEED:-0}" --ckpt_every "${CKPT_EVERY:-500}"
        --keep_last "${KEEP:-2}" --no-sample)
[ -n "${DATA:-}" ] && COMMON+=(--data "$DATA")   # another .npz (experiments/turning_toy.py data writes one)
[ -n "${MODEL:-}" ] && COMMON+=($MODEL)           # model size, e.g. the small pair's "--dim 64 --ffn_dim 256 ..."
WARM_KEEP=(--keep_last 20)   # every warm-up checkpoint stays: the quick-start candidates are read from them

resume() { [ -e "$1/latest" ] && echo --resume || true; }

if [ ! -e "$OUT/warmup/step_$(printf %07d "$WARMUP")" ]; then
    echo "== warm-up: teacher forcing to step $WARMUP ($(date -u +%H:%M))"
    OMP_NUM_THREADS=${WARM_THREADS:-2} python train.py --out "$OUT/warmup" --steps "$WARMUP" "${COMMON[@]}" "${WARM_KEEP[@]}" $(resume "$OUT/warmup")
fi
BRANCHES=${BRANCHES:-tf rf}
declare -A DEGRADE=([tf]="--degrade none" [rf]="--degrade autoregressive --resample_shift ${S:-0.6}"
                    [na]="--degrade noise --noise_aug_max ${NA:-0.1}")
for b in $BRANCHES; do
    if [ ! -e "$OUT/$b/latest" ]; then                 # branch: a copy of the warm-up's last checkpoint
        mkdir -p "$OUT/$b"
        cp -r "$OUT/warmup/step_$(printf %07d "$WARMUP")" "$OUT/$b/"
        ln -sfn "step_$(printf %07d "$WARMUP")" "$OUT/$b/latest"
    fi
done
echo "== branches $BRANCHES to step $STEPS ($(date -u +%H:%M))"
PIDS=()
for b in $BRANCHES; do
    OMP_NUM_THREADS=1 python train.py --out "$OUT/$b" --steps "$STEPS" "${COMMON[@]}" --resume \
        ${DEGRADE[$b]} > "$OUT/$b.log" 2>&1 &
    PIDS+=($!)
done
wait "${PIDS[@]}"
echo "== done ($(date -u +%H:%M)): python experiments/tune_toy.py $OUT/tf $OUT/rf --clips 64 --png $OUT/tf_vs_rf.png"
