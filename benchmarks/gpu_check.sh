#!/usr/bin/env bash
# Paper-scale speed check on one GPU (each part under a timeout, 7 min 50 s in all: the script stays under
# 8 minutes on an H200): the celeba64 preset's UNet (192/384/576 channels, 32x32x3 latents), batch 256,
# LoRA rank 8 on attention.
#   1. DP step / non-private step per grad_sample_mode (fused, hooks), time and peak memory;
#   2. noise multiplicity k = 1 and 4 (default mode);
#   3. sampling: DPLDMPipeline with the LoRA fused vs a plain diffusers loop;
#   4. public base families at their Hub checkpoints' configs (random weights, no download): DiT-XL-2-256
#      (4x32x32 latents) and the CompVis LDM-celebahq-256 UNet (3x64x64), DP / non-private step, fused and hooks.
#   5. Stable Diffusion: the SD-1.5 UNet config (random weights, 4x64x64 latents, 77x768 text context), batch 32,
#      bf16 base, gradient checkpointing, fused DP / non-private step and images/s.
#   6. SDXL: the SDXL-base UNet config (random weights, 1024 px: 4x128x128 latents, 77x2048 context, pooled
#      embeddings and time ids), batch 8, bf16 base, gradient checkpointing, fused DP / non-private step, images/s.
#   7. SD3.5-medium's transformer config (1024 px, 154-token contexts) and 8. FLUX.1-dev's (12B parameters, 512 px,
#      512-token T5 contexts, guidance), batch 4, bf16 base, gradient checkpointing, fused DP / non-private step.
# Results land in benchmarks/results/gpu/ (JSON + markdown). Usage: bash benchmarks/gpu_check.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
OUT=benchmarks/results/gpu
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
timeout 110 "$PY" benchmarks/bench_dp_step.py --device cuda --preset celeba64 --batch_size 256 \
    --targets attention --modes fused,hooks --ks 1,4 --reps 5 --warmup 2 --out "$OUT/dp_step.json"
timeout 55 "$PY" benchmarks/bench_sampling.py --device cuda --preset celeba64 --batch_size 64 --steps 50 \
    --reps 5 --warmup 2 --out "$OUT/sampling.json"
timeout 65 "$PY" benchmarks/bench_families.py --device cuda --scale real --families dit,compvis --batch_size 32 \
    --reps 5 --warmup 2 \
    --out "$OUT/dp_step_families.json"
timeout 50 "$PY" benchmarks/bench_families.py --device cuda --scale real --families sd --modes fused --batch_size 32 \
    --mixed_precision bf16 --gradient_checkpointing --reps 3 --warmup 1 --out "$OUT/dp_step_sd.json"
timeout 55 "$PY" benchmarks/bench_families.py --device cuda --scale real --families sdxl --modes fused --batch_size 8 \
    --mixed_precision bf16 --gradient_checkpointing --reps 3 --warmup 1 --out "$OUT/dp_step_sdxl.json"
timeout 55 "$PY" benchmarks/bench_families.py --device cuda --scale real --families sd3 --modes fused --batch_size 4 \
    --mixed_precision bf16 --gradient_checkpointing --reps 3 --warmup 1 --out "$OUT/dp_step_sd3.json"
timeout 80 "$PY" benchmarks/bench_families.py --device cuda --scale real --families flux --modes fused --batch_size 4 \
    --mixed_precision bf16 --gradient_checkpointing --reps 3 --warmup 1 --out "$OUT/dp_step_flux.json"
