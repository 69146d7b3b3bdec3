#!/usr/bin/env python
"""CORTEX serving many neurons at once: K neurons x N concurrent clients, three ways, side by side in one run.

    python benchmarks/bench_cortex.py --neurons 1 3 6 --clients 1 4 8 16 --tokens 64 --repeats 3

Each of N client threads sends requests back to back (each decodes exactly --tokens tokens: the end token does
not stop it), cycling over K neurons with adapters shaped like the distilled ones (rank 16 on the attention and
MLP layers of every block, random weights). Ways:

- `batched`: CORTEX as it is: every request joins one continuous batch, each row with its own neuron's adapter;
- `one-neuron`: the same batch with every request for one neuron (the ceiling: no per-row adapters);
- `switch`: one request at a time, the adapter attached to the base before each (how CORTEX served before
  batching, and what `mlx_lm.server` does: one model + adapter, reloaded to switch).

Prints total generated tokens/s and per-request latency (p50 / p95) as the median over --repeats runs with
their range, and the ratios batched / one-neuron and batched / switch. `--model random-smollm2` builds a
random-weight model of SmolLM2-135M's shape (with the tokenizer of --tokenizer-from) for machines without the
offline models. The base computes in float32 on the CPU and bfloat16 on a GPU. `--lora-products` times only
the per-row LoRA product: gather_mm (what CORTEX uses), gathering the matrices then multiplying, one adapter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import conch_dna  # noqa: E402,F401

KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]
PROMPTS = ["Explain how a hash map works.", "Plan the steps to fix a failing test.", "What should I remember about "
           "this meeting?", "Reflect on what went wrong in the last release.", "List three ways to speed up a loop.",
           "Which tool should I call to read a file?", "Summarise the idea of knowledge distillation.",
           "Why does the build fail after the upgrade?"]


def prepare(args, root: Path):
    """The base model folder and a registry with the largest K neurons asked for."""
    from conch_dna.cortex import NeuronRegistry
    from conch_dna.models import model_path
    from conch_dna.models.tiny import build_random_adapter, build_tiny_model

    if args.model == "random-smollm2":
        base = build_tiny_model(root / "base", seed=0, tokenizer_from=args.tokenizer_from, num_layers=30, hidden_size=576,
                                num_heads=9, num_kv_heads=3, intermediate_size=1536)
    else:
        base = model_path(args.model)
        if base is None:
            raise SystemExit(f"no local model {args.model!r}: give a model folder, default-student or random-smollm2")
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    registry = NeuronRegistry(root / "registry", base_model=base)
    for k in range(max(args.neurons)):
        adapter = build_random_adapter(base, root / f"adapter{k}", seed=k, rank=16, num_layers=layers, keys=KEYS,
                                       scale=2.0, std=0.02)
        registry.register(f"neuron{k}", adapter)
    return base, registry


def load(base: Path):
    """The base model as CORTEX loads it (float32 on the CPU, bfloat16 on a GPU)."""
    import mlx.core as mx

    from conch_dna.models import load_model

    model, tokenizer = load_model(str(base))
    mx.eval(model.parameters())
    return model, tokenizer


class SwitchPerRequest:
    """One request at a time on the base model, its neuron's adapter attached first (the way before batching)."""

    def __init__(self, model, tokenizer, registry):
        self.model, self.tokenizer, self.registry = model, tokenizer, registry
        self.lock = threading.Lock()
        self.attached = None
        self.weights = {}

    def answer(self, neuron: str, ids: list[int], tokens: int) -> int:
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        from conch_dna.neuron import add_lora_layers

        version = self.registry.active(neuron)
        with self.lock:
            if self.attached != neuron:
                folder = self.registry.verify(version)
                config = json.loads((folder / "adapter_config.json").read_text())
                if self.attached is None:  # the adapters share one LoRA layout: wrapped once, weights swapped
                    add_lora_layers(self.model, config["num_layers"], config["lora_parameters"])
                weights = self.weights.setdefault(neuron, list(mx.load(str(folder / "adapters.safetensors")).items()))
                self.model.load_weights(weights, strict=False)
                mx.eval(self.model.parameters())
                self.attached = neuron
            return sum(1 for _ in generate_step(mx.array(ids), self.model, max_tokens=tokens))


def run_clients(ask, neurons: list[str], clients: int, per_client: int, ids: list[list[int]]):
    """N threads sending requests back to back: (total tokens, wall seconds, per-request latencies)."""
    latencies, tokens = [], []
    lock = threading.Lock()

    def client(c: int):
        for r in range(per_client):
            neuron = neurons[(c + r * clients) % len(neurons)]
            t = time.perf_counter()
            n = ask(neuron, ids[(c + r) % len(ids)])
            with lock:
                latencies.append(time.perf_counter() - t)
                tokens.append(n)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tokens), time.perf_counter() - start, latencies


def lora_products(rows: int = 16, slots: int = 8, d_in: int = 576, rank: int = 8, d_out: int = 1536, reps: int = 500):
    """Microseconds per LoRA update of a batch whose rows use different adapters, three ways."""
    import mlx.core as mx

    a, b = mx.random.normal((slots, d_in, rank)), mx.random.normal((slots, rank, d_out))
    x, idx = mx.random.normal((rows, 1, d_in)), mx.array([i % 6 for i in range(rows)])
    ways = {"gather_mm (CORTEX)": lambda: mx.gather_mm(mx.gather_mm(x, a, rhs_indices=idx), b, rhs_indices=idx),
            "take + matmul": lambda: (x @ a[idx]) @ b[idx],
            "one adapter for all rows": lambda: (x @ a[0]) @ b[0]}
    for name, fn in ways.items():
        for _ in range(10):
            mx.eval(fn())
        t = time.perf_counter()
        for _ in range(reps):
            mx.eval(fn())
        print(f"{name:<26} {(time.perf_counter() - t) / reps * 1e6:8.1f} us  ({rows} rows, {d_in} x {rank} x {d_out})")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def measure(args, cortex, switch, k: int, n: int, way: str, ids) -> dict:
    neurons = [f"neuron{i}" for i in range(k)] if way != "one-neuron" else ["neuron0"]
    if way == "switch":
        ask = lambda neuron, p: switch.answer(neuron, p, args.tokens)  # noqa: E731
    else:
        ask = lambda neuron, p: cortex.stream(neuron, p, max_tokens=args.tokens, ignore_eos=True).text() and args.tokens  # noqa: E731
    per_client = max(args.min_requests // n, 2)
    run_clients(ask, neurons, n, 1, ids)  # warm-up: adapters loaded, kernels built
    runs = [run_clients(ask, neurons, n, per_client, ids) for _ in range(args.repeats)]
    rates = [t / s for t, s, _ in runs]
    lat = [x for _, _, ls in runs for x in ls]
    return {"way": way, "neurons": k, "clients": n, "tok_s": statistics.median(rates), "tok_s_min": min(rates),
            "tok_s_max": max(rates), "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95), "requests": len(lat)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--model", default="default-student", help="base model id or folder, or random-smollm2")
    ap.add_argument("--tokenizer-from", default=None, help="with random-smollm2: a model folder whose tokenizer to use")
    ap.add_argument("--neurons", type=int, nargs="+", default=[1, 3, 6])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per request")
    ap.add_argument("--min-requests", type=int, default=16, help="requests per run, at least 2 per client")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ways", nargs="+", default=["batched", "one-neuron", "switch"])
    ap.add_argument("--json", type=Path, help="also write every row as a JSON line here")
    ap.add_argument("--lora-products", action="store_true", help="only time the per-row LoRA product three ways")
    args = ap.parse_args(argv)
    if args.lora_products:
        lora_products()
        return 0

    import mlx.core as mx

    from conch_dna.cortex import Cortex
    from conch_dna.neuron import chat_prompt_ids

    with tempfile.TemporaryDirectory() as tmp:
        base, registry = prepare(args, Path(tmp))
        model, tokenizer = load(base)
        cortex = Cortex(registry, model=model, tokenizer=tokenizer, max_batch=max(args.clients))
        switch = SwitchPerRequest(*load(base), registry)
        ids = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
        dtype = model.model.embed_tokens.weight.dtype
        print(f"device {mx.default_device()}, base {args.model} ({dtype}), {args.tokens} tokens per request, "
              f"median of {args.repeats} runs [min-max]")
        print(f"{'way':<11} {'K':>2} {'N':>3} {'tokens/s':>24} {'p50 s':>7} {'p95 s':>7}")
        rows = []
        for k in args.neurons:
            for n in args.clients:
                got = {}
                for way in args.ways:
                    if way == "one-neuron" and k > 1 and any(r["way"] == way and r["clients"] == n for r in rows):
                        got[way] = next(r for r in rows if r["way"] == way and r["clients"] == n)
                        continue
                    row = got[way] = measure(args, cortex, switch, k, n, way, ids)
                    rows.append(row)
                    print(f"{way:<11} {k:>2} {n:>3} {row['tok_s']:>9.1f} [{row['tok_s_min']:.1f}-{row['tok_s_max']:.1f}]"
                          f" {row['p50_s']:>7.2f} {row['p95_s']:>7.2f}", flush=True)
                if "batched" in got:
                    ratios = {w: got["batched"]["tok_s"] / got[w]["tok_s"] for w in ("one-neuron", "switch") if w in got}
                    print("  batched / " + ", ".join(f"{w} {r:.2f}x" for w, r in ratios.items()), flush=True)
                    rows.append({"way": "ratio", "neurons": k, "clients": n, **ratios})
        cortex.close()
        if args.json:
            args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
