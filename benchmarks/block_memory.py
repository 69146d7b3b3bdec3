#!/usr/bin/env python
"""What one student block keeps for its backward pass, per gradient-checkpoint scope: Qwen2.5-0.5B widths
(the `qwen2.5-1.5b->0.5b` preset's student), LoRA on q/k/v/o, the compiled forward + backward of a 2-block
and a 4-block model; the difference in peak memory over two blocks is what a block costs.

With --mixed N: also an N-block model with the MLPs recomputed and the first w blocks whole
(grad_checkpoint_whole_blocks = w, for w = 0, 1, 2, 4, ... N), its measured peak beside what
`memory.backward_peak` predicts from the per-block figures above.

    python benchmarks/block_memory.py                        # CPU, float32, 1 x 1024 tokens
    python benchmarks/block_memory.py --mixed 8              # and the mixed policy on 8 blocks
    python benchmarks/block_memory.py --batch 8 --dtype bfloat16   # on the GPU machine

Prints one JSON line per measurement and a table.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# isort: off
import conch_dna  # noqa: E402,F401  (optimized BLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
# isort: on
from benchmarks.bench_kd import PEER_LORA, PRESETS, build  # noqa: E402
from conch_dna.training.kd import KDConfig  # noqa: E402
from conch_dna.training.kd.lean import checkpoint_blocks, lean_backward
from conch_dna.training.kd.trainer import apply_lora

VOCAB = 1000  # the head is not what is measured here


def peak_bytes(layers: int, scope: str | None, batch: int, seq: int, dtype, lean: bool, whole: int = 0) -> int:
    _, shape, _, _, _ = PRESETS["qwen2.5-1.5b->0.5b"]
    mx.random.seed(0)
    model = build({**shape, "layers": layers}, VOCAB, dtype)
    apply_lora(model, KDConfig(lora=PEER_LORA))
    if lean:
        lean_backward(model)
    if scope:
        checkpoint_blocks(model, 1, scope, whole)
    mx.eval(model.parameters())
    tokens = mx.random.randint(0, VOCAB, (batch, seq))

    def loss(m, t):
        h = m.model(t).astype(mx.float32)
        return (h * h).mean()

    loss_and_grad = nn.value_and_grad(model, loss)
    step = mx.compile(lambda t: loss_and_grad(model, t), inputs=[model.state], outputs=[model.state])
    mx.eval(step(tokens))  # compile and warm up
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(step(tokens))
    mx.synchronize()
    return mx.get_peak_memory() - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--lean-backward", choices=["on", "off"], default="on", help="lean.lean_backward (on = default)")
    ap.add_argument("--mixed", type=int, metavar="N", help="also N blocks, MLPs recomputed, the first w whole")
    args = ap.parse_args()
    dtype = getattr(mx, args.dtype)
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    rows = []
    for scope in (None, "mlp", "block"):
        two, four = (peak_bytes(n, scope, args.batch, args.seq, dtype, args.lean_backward == "on") for n in (2, 4))
        per_block = (four - two) / 2
        rows.append({"scope": scope or "none", "device": device, "dtype": args.dtype, "lean_backward": args.lean_backward, "B": args.batch, "T": args.seq,
                     "per_block_mib": round(per_block / 2**20, 1),
                     "per_block_token_kib": round(per_block / (args.batch * args.seq) / 2**10, 2)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| checkpoint scope | kept per block ({args.batch} x {args.seq}, {args.dtype}, {device}, lean_backward "
          f"{args.lean_backward}) |\n|---|---|")
    for r in rows:
        print(f"| {r['scope']} | {r['per_block_mib']} MiB ({r['per_block_token_kib']} KiB per token) |")
    if args.mixed:
        mixed(args, dtype, device, {r["scope"]: r["per_block_mib"] for r in rows})


def mixed(args, dtype, device: str, per_block_mib: dict) -> None:
    """Measured peaks of N blocks, MLPs recomputed, the first w whole, against `backward_peak`'s prediction:
    kept per block as measured above (mlp, block); recomputed parts: a block's own activations (none - block
    for a whole one, none - mlp for an MLP); the fixed part: the 2-block model's peak less its blocks'."""
    from conch_dna.training.kd.memory import backward_peak

    n = args.mixed
    lean = args.lean_backward == "on"
    kept = {"mlp": per_block_mib["mlp"], "whole": per_block_mib["block"]}
    recomputed = {"mlp": per_block_mib["none"] - per_block_mib["mlp"], "whole": per_block_mib["none"] - per_block_mib["block"]}
    base = peak_bytes(2, "block", args.batch, args.seq, dtype, lean) / 2**20 - backward_peak(["whole"] * 2, kept, recomputed)
    print(f"\n| {n} blocks, MLPs recomputed, first w whole | measured peak | backward_peak's |\n|---|---|---|")
    for w in sorted({0, 1, *range(2, n + 1, 2), n}):
        measured = peak_bytes(n, "mlp", args.batch, args.seq, dtype, lean, whole=w) / 2**20
        predicted = base + backward_peak(["whole"] * w + ["mlp"] * (n - w), kept, recomputed)
        row = {"blocks": n, "whole": w, "device": device, "dtype": args.dtype, "B": args.batch, "T": args.seq,
               "measured_mib": round(measured, 1), "predicted_mib": round(predicted, 1)}
        print(json.dumps(row), flush=True)
        print(f"| {w} | {row['measured_mib']} MiB | {row['predicted_mib']} MiB |")


if __name__ == "__main__":
    main()
