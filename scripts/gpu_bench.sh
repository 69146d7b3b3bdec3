#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md: one H100/H200, MLX's CUDA backend staged as in
# ../shared/device/mlx-cuda.md, the PyTorch peer (../shared/bench/peer_torch_kd.py) copied to $PEER.
# Every configuration runs in its own process (an out-of-memory must not end the others).
# `bash scripts/gpu_bench.sh a` and `... b` split the session-3 table into two runs of < 10 minutes;
# `... c` is session 4's: the trainer's own loop end to end (teacher prefetch, memory limit), with the peer;
# `... d` session 5's: checkpointing only the blocks' MLPs (grad_checkpoint_scope = "mlp").
# `... tests`: the kernel and fused-loss tests on the GPU.
# `... 8gb-batch`: within 8 GB, batch 64 (2 x 32) against batch 32, with the Liger peer, twice.
# `... 8gb-limit`: the 8 GB setting under MLX memory limits 7.25 (the chooser's), 7.6 and none, with the peer, twice.
# `... 8gb-smaller-batch`: within 8 GB without a memory limit, micro-batches of 24 and 28 against the chooser's 32, with the peer, twice.
# `... 8gb-queue-nolimit`: the 8 GB setting without a memory limit, MLX's CUDA graphs closed at 25 or 50 MB, against the chooser's pick.
# `... 8gb-phases`: the 8 GB setting's peak split by phase (teacher pass queued / the rest), without a limit and under the chooser's, with the peer, twice.
# `... 8gb-profile`: where the 8 GB step's GPU time goes (kernels by kind and name, busy share) under the chooser's limit and without one; then limit 7.4 against the pick and the peer.
# `... 8gb-flat`: the update over one vector against the per-parameter one (OLD: a checkout before it), within 8 GB, with the peer, twice; then one profiled run.
# `... 8gb-flat-3`: the chooser's 8 GB pick with the flat update against the peer, three times alternated, then the per-parameter update once (OLD).
set -u
OUT=${OUT:-/tmp/bench-out}; PEER=${PEER:-.carry/b/peer_torch_kd.py}; mkdir -p "$OUT"
P='qwen2.5-1.5b->0.5b'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
run() { echo "== mlx $*"; timeout 170 python3 scripts/bench_kd.py --preset "$P" --steps 5 --impl fused --out "$OUT/bench.jsonl" "$@" 2>&1 | grep -E '^\{|Error' | tail -1; }
peer() { echo "== torch peer B=$1"; timeout 150 python3 "$PEER" "$1" 2>&1 | tail -1 | tee -a "$OUT/peer.jsonl"; }
# The Liger peer's best within 8 GB (batch 32, checkpointed), after an env line naming it, appended to file $1.
liger8() { echo '{"env": "liger 32 ckpt"}' >> "$1"; timeout 150 python3 scripts/peer_liger_kd.py 32 ckpt 2>&1 | tail -1 | tee -a "$1"; }
tr() { echo "== trainer $*"; timeout 170 python3 scripts/bench_kd.py --preset "$P" --trainer --warmup 2 --steps 8 --out "$OUT/bench.jsonl" "$@" 2>&1 | grep -E '^\{|Error' | tail -1; }
# The chooser's 8 GB pick (1 x 32, every block recomputed, chunk 512, limit 7.25, queue 100 MB), after an env line
# naming it, appended to file $1 (more flags after it).
pick8() { f8=$1; shift; echo '{"env": "8 GB chooser (1 x 32, limit 7.25)"}' >> "$f8"; tr --batch 32 --memory-budget-gb 8 --steps 6 --out "$f8" "$@"; }
# One unrecorded run of it: the first run on a fresh machine compiles kernels (one ran past 170 s).
warmup8() { timeout 240 python3 scripts/bench_kd.py --preset "$P" --trainer --warmup 2 --steps 1 --batch 32 --memory-budget-gb 8 > /dev/null 2>&1; }
part=${1:-all}
if [ "$part" = a ] || [ "$part" = all ]; then
  peer 8
  # Session 2's configuration (eager step, mlx-lm's LoRA layer), then each session-3 change on top.
  run --batch 8 --chunk 2048 --teacher-pass-tokens 8192 --compile off --stock-lora
  run --batch 8 --chunk 2048 --teacher-pass-tokens 8192 --compile off
  run --batch 8 --chunk 2048 --teacher-pass-tokens 8192
  run --batch 8 --chunk 2048
  run --batch 8 --chunk 512 --teacher-pass-tokens 8192 --grad-checkpoint
  run --batch 8 --chunk 512 --grad-checkpoint
  run --batch 8 --chunk 1024 --grad-checkpoint --checkpoint-every 2
fi
if [ "$part" = b ] || [ "$part" = all ]; then
  run --batch 8 --chunk 1024 --teacher-pass-tokens 8192 --grad-checkpoint
  run --batch 8 --chunk 2048 --teacher-pass-tokens 8192 --grad-checkpoint
  run --batch 16 --chunk 2048 --teacher-pass-tokens 16384
  run --batch 16 --chunk 1024 --grad-checkpoint
  peer 16
  python3 scripts/profile_student.py 2>&1 | grep '^{' | tee "$OUT/student_profile.jsonl"
  python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py | tail -1 | tee "$OUT/kernel_tests.txt"
fi
if [ "$part" = c ] || [ "$part" = all ]; then
  peer 8
  tr --batch 8 --chunk 2048
  tr --batch 8 --chunk 2048 --prefetch off
  tr --batch 8 --chunk 1024 --grad-checkpoint --checkpoint-every 2 --memory-limit-gb 15
  tr --batch 8 --chunk 1024 --grad-checkpoint --checkpoint-every 2 --memory-limit-gb 15 --prefetch off
  tr --batch 8 --chunk 1024 --grad-checkpoint --memory-limit-gb 15
  tr --batch 8 --chunk 512 --grad-checkpoint --checkpoint-every 2 --memory-limit-gb 15.5
  tr --batch 16 --chunk 2048
  tr --batch 16 --chunk 1024 --grad-checkpoint --checkpoint-every 2 --memory-limit-gb 24
fi
if [ "$part" = d ]; then
  # The peer, the defaults and the 16 GB recipe (MLPs checkpointed + a memory limit) side by side, three
  # times; then the single rows of the session-5 table.
  M="--batch 8 --chunk 2048 --grad-checkpoint --checkpoint-scope mlp"
  for i in 1 2 3; do
    peer 8
    tr --batch 8 --chunk 2048
    tr $M --memory-limit-gb 15
    tr $M --memory-limit-gb 15.5
  done
  tr $M
  tr --batch 8 --chunk 1024 --grad-checkpoint --checkpoint-scope mlp
  tr $M --memory-limit-gb 15.5 --prefetch off
  tr --batch 8 --chunk 1024 --grad-checkpoint --checkpoint-scope mlp --checkpoint-every 2 --memory-limit-gb 15.5
  tr --batch 16 --chunk 2048 --grad-checkpoint --checkpoint-scope mlp --memory-limit-gb 24
  python3 scripts/block_memory.py --batch 8 --dtype bfloat16 | tee "$OUT/block_memory.txt"
fi
if [ "$part" = frontier ]; then
  # Session 8 (issue 22): the best tokens/s within 8, 16, 25 and 40 GB, ours (settings_for_budget's choice for
  # batches 8 and 16) and the Liger peer's (batches 8, 16, 32, each with and without checkpointing).
  python3 scripts/bench_kd.py --preset "$P" --frontier --frontier-batches 8 16 --peer-liger "${LIGER:-.carry/b/peer_liger_kd.py}" \
    --peer-batches 8 16 32 --steps 8 --repeats "${REPEATS:-1}" --run-timeout 150 \
    --out "$OUT/frontier.jsonl" --plot "$OUT/frontier.png" 2> "$OUT/frontier.err"
fi
if [ "$part" = frontier-a ] || [ "$part" = frontier-b ]; then
  # Issue 22's frontier with spreads, split into two calls of < 10 minutes on one machine start: a = 8 and
  # 40 GB (the peer's best there: batch 32 with / without checkpointing), b = 16 and 25 GB (batch 64 with
  # checkpointing). Each: one unrecorded warm-up run, then ours and the peer's interleaved, twice. The table:
  # python3 scripts/bench_kd.py --summarise $OUT/frontier-a.jsonl $OUT/frontier-b.jsonl --plot F.png
  if [ "$part" = frontier-a ]; then budgets="8 40"; peer_batches=32; else budgets="16 25"; peer_batches=64; fi
  python3 scripts/bench_kd.py --preset "$P" --frontier --frontier-batches 32 --budgets $budgets \
    --peer-liger scripts/peer_liger_kd.py --peer-batches $peer_batches --steps 6 --repeats "${REPEATS:-2}" \
    --run-timeout 150 --out "$OUT/$part.jsonl" 2> "$OUT/$part.err"
fi
if [ "$part" = lean ]; then
  # Session 12 (issue 22): each part of lean_backward alone and both (the SwiGLU backward as one CUDA kernel),
  # the kernels' GPU tests, the whole step's kernels, then the trainer with it off and on, alternating
  # (batch 8, chunk 2048).
  for v in norms mlps all; do
    k=""; [ "$v" = all ] && k="--kernels"
    python3 scripts/profile_student.py --only-lora --lean-backward $v $k 2>&1 | grep '^{' | tee "$OUT/student_kernels_$v.jsonl" | grep '"name"'
  done
  python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fused.py -k "lean or swiglu" 2>&1 | tail -1 | tee "$OUT/lean_tests.txt"
  timeout 200 python3 scripts/bench_kd.py --preset "$P" --impl fused --batch 8 --chunk 2048 --steps 5 --kernels 2>&1 | grep '^{' | tee "$OUT/step_kernels.jsonl"
  for i in 1 2; do
    tr --batch 8 --chunk 2048 --lean-backward off
    tr --batch 8 --chunk 2048
  done
fi
if [ "$part" = tests ]; then
  # Issue 22's "no loss of exactness": the kernel and fused-loss tests on the GPU (MLX's default device there).
  python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fused.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
fi
if [ "$part" = 8gb-batch ]; then
  # Within 8 GB, batch 64 as two micro-batches of 32 (the chooser's pick) against batch 32 as one (the step's
  # fixed costs, optimizer and clipping on ~200 small LoRA arrays, paid once per 64k tokens), with the peer's
  # best there, alternated twice in one start.
  f="$OUT/8gb-batch.jsonl"
  for i in 1 2; do
    for b in 32 64; do echo "{\"env\": \"8 GB batch $b\"}" >> "$f"; tr --batch $b --memory-budget-gb 8 --steps 6 --out "$f"; done
    liger8 "$f"
  done
fi
if [ "$part" = 8gb-limit ]; then
  # The 8 GB setting's floor (7.41 GB) is above its 7.25 GB limit, so MLX waits after every operation past it:
  # what does that wait cost, and how far past the budget does the peak go with a higher limit or none?
  # The chooser's pick (1 x 32, every block recomputed, chunk 512, queue 100 MB) with limits 7.25, 7.6 and
  # none, and the peer's best there, alternated twice in one start.
  f="$OUT/8gb-limit.jsonl"; s="--batch 32 --grad-checkpoint --chunk 512 --queue-mb 100 --steps 6 --out $f"
  for i in 1 2; do
    pick8 "$f"
    echo '{"env": "limit 7.6"}' >> "$f"; tr $s --memory-limit-gb 7.6
    echo '{"env": "no limit"}' >> "$f"; tr $s
    liger8 "$f"
  done
fi
if [ "$part" = 8gb-smaller-batch ]; then
  # Session 23: the 8 GB setting (1 x 32) ran 81k without a memory limit against ~79k under it, but peaked at 8.75
  # GB. A smaller micro-batch holds less (block inputs and the recomputed block scale with it): does one of 24 or
  # 28 without a limit stay within 8 GB, and is it faster than 32 under the limit? Alternated twice with the peer.
  f="$OUT/8gb-smaller-batch.jsonl"
  for i in 1 2; do
    pick8 "$f"
    for b in 24 28; do
      echo "{\"env\": \"1 x $b, blocks, chunk 512, queue 100 MB, no limit\"}" >> "$f"
      tr --batch $b --grad-checkpoint --chunk 512 --queue-mb 100 --steps 6 --out "$f"
    done
    liger8 "$f"
  done
fi
if [ "$part" = 8gb-queue-nolimit ]; then
  # Session 23: without a memory limit the 8 GB setting ran 81k at 8.75 GB, 1.38 GB over its floor: work MLX
  # queued ahead of the GPU, at most 10 graphs of ~MLX_MAX_MB_PER_BUFFER (100) MB of inputs each (mlx/transforms.cpp,
  # MAX_ACTIVE_TASKS). Smaller graphs queue less: does 25 or 50 MB keep the peak within 8 GB, no limit (whose
  # waits cost ~2.5%), and run faster than the chooser's pick? One unrecorded warm-up run, then alternated twice
  # with the pick and the peer.
  f="$OUT/8gb-queue-nolimit.jsonl"
  warmup8
  for i in 1 2; do
    for q in 25 50; do
      echo "{\"env\": \"1 x 32, blocks, chunk 512, queue $q MB, no limit\"}" >> "$f"
      tr --batch 32 --grad-checkpoint --chunk 512 --queue-mb $q --steps 6 --out "$f"
    done
    pick8 "$f"
    liger8 "$f"
  done
fi
if [ "$part" = 8gb-phases ]; then
  # Session 23, start 4 (once, with --steps 3: the device time left): where the 8 GB setting's peak arises,
  # while the teacher's next pass is being queued or in the rest of the step (`--phase-peaks`), without a limit
  # and under the chooser's, with the peer. One unrecorded warm-up run first, then alternated twice.
  f="$OUT/8gb-phases.jsonl"
  warmup8
  for i in 1 2; do
    echo '{"env": "1 x 32, blocks, chunk 512, queue 100 MB, no limit"}' >> "$f"
    tr --batch 32 --grad-checkpoint --chunk 512 --queue-mb 100 --phase-peaks --steps 6 --out "$f"
    pick8 "$f" --phase-peaks
    liger8 "$f"
  done
fi
if [ "$part" = 8gb-profile ]; then
  # Session 24: the 8 GB trainer step profiled (`--kernels`: kernel time by kind and for the top kernels, the
  # GPU's busy share), under the chooser's limit and without one; then a limit of 7.4 against the pick and the
  # peer (the peak ran ~0.55 GB over limits of 7.25 and 7.6).
  f="$OUT/8gb-profile.jsonl"; s="--batch 32 --grad-checkpoint --chunk 512 --queue-mb 100 --steps 6 --out $f"
  warmup8
  pick8 "$f" --kernels
  echo '{"env": "1 x 32, blocks, chunk 512, queue 100 MB, no limit, profiled"}' >> "$f"; tr $s --kernels
  for i in 1 2; do
    echo '{"env": "1 x 32, blocks, chunk 512, queue 100 MB, limit 7.4"}' >> "$f"; tr $s --memory-limit-gb 7.4
    pick8 "$f"
    liger8 "$f"
  done
fi
if [ "$part" = 8gb-flat ]; then
  # Session 24: the update over one vector (flat.FlatLayout) against the per-parameter update it replaced
  # (OLD: a checkout of the commit before, e.g. `git archive caabde1 conch_dna scripts config pyproject.toml`),
  # the chooser's 8 GB pick each, alternated twice with the peer; then the new one profiled (`--kernels`).
  f="$OUT/8gb-flat.jsonl"; OLD=${OLD:-/tmp/old}
  warmup8
  for i in 1 2; do
    pick8 "$f"
    echo '{"env": "per-parameter update (before session 24)"}' >> "$f"
    (cd "$OLD" && tr --batch 32 --memory-budget-gb 8 --steps 6 --out "$f")
    liger8 "$f"
  done
  pick8 "$f" --kernels
fi
if [ "$part" = 8gb-flat-3 ]; then
  # Session 24, another machine start: the acceptance figure with three runs each, then OLD once.
  f="$OUT/8gb-flat-3.jsonl"; OLD=${OLD:-/tmp/old}
  warmup8
  for i in 1 2 3; do
    pick8 "$f"
    liger8 "$f"
  done
  echo '{"env": "per-parameter update (before session 24)"}' >> "$f"
  (cd "$OLD" && tr --batch 32 --memory-budget-gb 8 --steps 6 --out "$f")
fi
