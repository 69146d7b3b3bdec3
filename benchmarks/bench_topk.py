#!/usr/bin/env python
"""Teacher-cache size and the error of the top-k approximation, on the real default pair.

    python benchmarks/bench_topk.py [--tokens 1024]

The teacher and the untrained student read held-out real text; the KD loss with the teacher's dense
logits is compared with the loss from its cached top-k (float16 logits, as stored) for several k and T.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Order matters: conch_dna loads the optimized BLAS, which only works before mlx is imported.
# isort: off
import conch_dna  # noqa: E402,F401
import mlx.core as mx  # noqa: E402
# isort: on
from conch_dna.models import load_model  # noqa: E402
from conch_dna.training.kd import SparseTargets, compute_kd_loss, topk_targets  # noqa: E402
from conch_dna.training.kd.teacher_cache import tail_logsumexp

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=1024)
args = ap.parse_args()
text_path = Path("/usr/share/doc/python3.11/html/_sources/tutorial/datastructures.rst.txt")
text = text_path.read_text() if text_path.is_file() else Path(json.__file__).read_text()
teacher, tok = load_model("default-teacher")
student, _ = load_model("default-student")
ids = mx.array(tok.encode(text)[: args.tokens])[None]
t_logits, s_logits = teacher(ids), student(ids)
V = t_logits.shape[-1]
print(f"vocab {V}; dense bf16 targets: {2 * V} bytes/token")
print("| k | bytes/token | fraction of dense bf16 | rel. KD error T=1 | T=2 | T=4 |")
print("|---|---|---|---|---|---|")
for k in (8, 16, 32, 48, 64, 128):
    t = topk_targets(t_logits, k)
    # As stored in the cache: float16 logits, exact tail (see data.TeacherCache).
    top16 = t.logits.astype(mx.float16).astype(mx.float32)
    stored = SparseTargets(top16, t.indices, mx.logaddexp(mx.logsumexp(top16, axis=-1), tail_logsumexp(t)))
    errs = []
    for T in (1.0, 2.0, 4.0):
        dense = compute_kd_loss(t_logits, s_logits, T).item()
        errs.append(abs(compute_kd_loss(stored, s_logits, T).item() - dense) / dense)
    nbytes = k * (2 + (2 if V <= 65536 else 4)) + 4
    print(f"| {k} | {nbytes} | 1/{2 * V / nbytes:.0f} | {errs[0]:.2%} | {errs[1]:.2%} | {errs[2]:.2%} |")
