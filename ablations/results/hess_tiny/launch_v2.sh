#!/usr/bin/env bash
# Background trainings of issue 16 (resumable: rerun this script; each run resumes from its ckpt.pt).
cd /work/main
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH=/work/main
R=/work/train_runs
# 1. hess-tiny-8h: warm start from hess-tiny v1 (q/k-norm re-initialised: 16-dim heads), head-averaged match loss.
nohup nice -n 19 python -m hess.train --render-bank 0-1200,4000-5200 --bank-dir $R/bank8 --views 8 \
  --model-config $R/tiny8.json --init-from $R/hess_tiny_v1.safetensors --init-reset '*.q_norm.*' '*.k_norm.*' \
  --out-dir $R/tiny8 --steps 4000 --lr 5e-4 --curriculum-steps 300 --frames-range 2 8 \
  --attn-heads all --attn-pool mean --threads 1 --eval-every 500 --eval-scenes 16 --no-wandb > $R/tiny8.log 2>&1 &
echo $! > $R/tiny8.pid
# 2. hess-tiny-pi3: from scratch, same bank, same match supervision (head-averaged), no location head.
while [ ! -f $R/bank8/shard_005100.pt ]; do sleep 10; done
nohup nice -n 19 python -m hess.train --bank-dir $R/bank8 --views 8 --family pi3 \
  --out-dir $R/pi3 --steps 6000 --lr 1e-3 --curriculum-steps 1500 --frames-range 2 8 --w-loc 0 \
  --attn-heads all --attn-pool mean --threads 1 --eval-every 500 --eval-scenes 16 --no-wandb > $R/pi3.log 2>&1 &
echo $! > $R/pi3.pid
