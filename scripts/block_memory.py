#!/usr/bin/env python
"""What one student block keeps for its backward pass, per gradient-checkpoint scope: Qwen2.5-0.5B widths
(the `qwen2.5-1.5b->0.5b` preset's student), LoRA on q/k/v/o, the compiled forward + backward of a 2-block
and a 4-block model; the difference in peak memory over two blocks is what a block costs.

    python scripts/block_memory.py                        # CPU, float32, 1 x 1024 tokens
    python scripts/block_memory.py --batch 8 --dtype bfloat16   # on the GPU machine

Prints one JSON line per scope (none / mlp / block) and a table.
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
from conch_dna.training.kd import KDConfig  # noqa: E402
from conch_dna.training.kd.trainer import apply_lora, checkpoint_blocks, lean_backward  # noqa: E402
from scripts.bench_kd import PEER_LORA, PRESETS, build  # noqa: E402

VOCAB = 1000  # the head is not what is measured here


def peak_bytes(layers: int, scope: str | None, batch: int, seq: int, dtype, lean: bool) -> int:
    _, shape, _, _, _ = PRESETS["qwen2.5-1.5b->0.5b"]
    mx.random.seed(0)
    model = build({**shape, "layers": layers}, VOCAB, dtype)
    apply_lora(model, KDConfig(lora=PEER_LORA))
    if lean:
        lean_backward(model)
    if scope:
        checkpoint_blocks(model, 1, scope)
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
    ap.add_argument("--lean-backward", choices=["on", "off"], default="on", help="trainer.lean_backward (on = default)")
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


if __name__ == "__main__":
    main()
