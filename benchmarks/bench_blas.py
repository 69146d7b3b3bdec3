"""Float32 1024^3 matmul GFLOP/s on MLX's CPU backend, with and without the optimized BLAS preload.

Each variant runs in its own process (the BLAS must be chosen before `mlx` is imported), side by side:
    python benchmarks/bench_blas.py [--size 1024] [--repeat 10]
"""

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import conch_dna
import mlx.core as mx
n, repeat = int(sys.argv[1]), int(sys.argv[2])
mx.set_default_device(mx.cpu)
a = mx.random.normal((n, n)); b = mx.random.normal((n, n)); mx.eval(a, b)
mx.eval(a @ b)  # warm-up
t = time.perf_counter()
for _ in range(repeat):
    mx.eval(a @ b)
dt = (time.perf_counter() - t) / repeat
print(json.dumps({"gflops": 2 * n**3 / dt / 1e9, "blas": conch_dna.blas_status()}))
"""


def run(blas: str, size: int, repeat: int) -> dict:
    env = {**os.environ, "CONCH_BLAS": blas}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", CHILD, str(size), str(repeat)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    ref = run("off", args.size, max(2, args.repeat // 5))
    opt = run("auto", args.size, args.repeat)
    print(f"float32 {args.size}^3 matmul, MLX CPU")
    print(f"  bundled reference BLAS : {ref['gflops']:8.1f} GFLOP/s")
    print(f"  optimized BLAS preload : {opt['gflops']:8.1f} GFLOP/s  ({opt['blas']['loaded'] or 'none found: ' + opt['blas']['reason']})")
    print(f"  speed-up               : {opt['gflops'] / ref['gflops']:8.1f}x")


if __name__ == "__main__":
    main()
