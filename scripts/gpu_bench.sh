#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md: one H100/H200, MLX's CUDA backend staged as in
# ../shared/device/mlx-cuda.md, the PyTorch peer (../shared/bench/peer_torch_kd.py) copied to $PEER.
# Every configuration runs in its own process (an out-of-memory must not end the others).
set -u
OUT=${OUT:-/tmp/bench-out}; PEER=${PEER:-.carry/b/peer_torch_kd.py}; mkdir -p "$OUT"
P='qwen2.5-1.5b->0.5b'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
run() { echo "== mlx $*"; timeout 150 python3 scripts/bench_kd.py --preset "$P" --steps 4 --out "$OUT/bench.jsonl" "$@" 2>&1 | grep '^{' | tail -1; }
peer() { echo "== torch peer B=$1"; timeout 150 python3 "$PEER" "$1" 2>&1 | tail -1 | tee -a "$OUT/peer.jsonl"; }
# Session 2 table (docs/benchmarks.md): the CUDA kernel on (default) and off, the peer, the memory settings.
peer 8
CONCH_FUSED_KERNEL=0 run --impl fused --batch 8 --chunk 1024
run --impl fused --batch 8 --chunk 1024
run --impl fused --batch 8 --chunk 2048
run --impl fused --batch 8 --chunk 4096
run --impl fused --batch 8 --chunk 1024 --grad-checkpoint
run --impl fused --batch 8 --chunk 512 --grad-checkpoint
run --impl fused --batch 16 --chunk 1024 --grad-checkpoint
run --impl fused --batch 16 --chunk 2048
peer 16
run --impl reference --batch 4
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py | tail -1 | tee "$OUT/kernel_tests.txt"
