#!/usr/bin/env bash
# Every GPU check in one command, for a short lease of one GPU (about 7 minutes on an H100/H200):
#
#   DATA=<prepared L=1024 dir> OUT=<dir> bash scripts/gpu_session.sh
#
#   1. `xdlm train` + `xdlm sample` on CUDA at L = 1024 (DiT-small, CONFIG = configs/owt_small.yaml
#      on DATA, STEPS steps, batch 32) for k = 0.1 and k = 0, T = 8 and 32 samples of each;
#   2. scripts/gpu_check.py (bf16 throughput and MFU of DiT-small);
#   3. scripts/gpu_llm_check.py: the 0.95B Llama-style denoiser under FSDP2, then --fused;
#   4. benchmarks/loss_bench.py on CUDA (CE, Liger FLCE and Cut Cross-Entropy where importable).
#
# Each step gets its own time limit, cut to what is left of BUDGET seconds in all, so one hang
# costs one step, not the lease. Everything goes to OUT: session.log (all output), loss_cuda.json,
# runs.tgz (the two runs without weights: config, metrics.jsonl, samples). Wheels in .whl/ (e.g.
# liger-kernel, cut-cross-entropy) are installed into /tmp/site first. Prepare DATA here with
#   xdlm prepare ../shared/data/text/wiki_vital.txt.gz --out .gpu/wiki-gpt2-L1024 --tokenizer gpt2 \
#       --tokenizer-source ../shared/data/tokenizers/gpt2 --seq-len 1024
set -u
OUT=${OUT:-runs/gpu-session}
CONFIG=${CONFIG:-configs/owt_small.yaml}
DATA=${DATA:-.gpu/wiki-gpt2-L1024}
STEPS=${STEPS:-200}
BUDGET=${BUDGET:-560}
DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-$(mktemp -d)}
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
exec > >(tee -a "$OUT/session.log") 2>&1
END=$((SECONDS + BUDGET))

step() {  # step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, time left), report rc and time
  local name=$1 limit=$2 left=$((END - SECONDS)) start=$SECONDS rc
  shift 2
  if [ "$left" -le 5 ]; then echo "== $name: skipped, budget spent"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@"
  rc=$?
  echo "== $name: rc=$rc in $((SECONDS - start))s"
}

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"

for k in 0.1 0; do
  step "train-k$k" 150 python3 -m xdlm train --config "$CONFIG" --out "$RUNS/k$k" \
    --set data.path="$DATA" --set kernel.k="$k" --set train.steps="$STEPS" \
    --set train.grad_accum=1 --set train.warmup_steps=30 --set train.ema_decay=0.999 \
    --set train.log_every=50 --set train.eval_every="$STEPS" --set train.save_every="$STEPS" \
    --set train.device="$DEVICE"
  for T in 8 32; do
    step "sample-k$k-T$T" 60 python3 -m xdlm sample --ckpt "$RUNS/k$k" --steps "$T" \
      --num-samples 8 --device "$DEVICE" --out "$RUNS/k$k/samples-T$T.jsonl"
  done
done
tar czf "$OUT/runs.tgz" --exclude='*.safetensors' --exclude='*.pt' -C "$RUNS" .

if [ "$DEVICE" = cuda ]; then
  step gpu-check 90 python3 scripts/gpu_check.py
  step llm-fsdp2 120 python3 scripts/gpu_llm_check.py
  step llm-fused 120 python3 scripts/gpu_llm_check.py --fused
  rm -f benchmarks/results/loss_cuda.json   # written after each size: only this run's figures
  step loss-bench 200 python3 -m benchmarks.loss_bench all --device cuda --repeats 1 \
    --name loss_cuda
  cp benchmarks/results/loss_cuda.json "$OUT/" 2>/dev/null
fi
echo "== done in ${SECONDS}s"
