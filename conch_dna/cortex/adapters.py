"""Many neurons' LoRA adapters on one base model at once, each row of a batch with its own.

Every linear layer some loaded adapter adapts is wrapped once in a `MultiLoRALinear`, which holds the A and B
matrices of all loaded adapters stacked by *slot* (slot 0 is the bare base: zeros). Before each forward pass the
batch's rows name their slots, and the layer adds `x @ A[slot] @ B[slot]` per row with MLX's `gather_mm`
(faster than gathering the matrices and multiplying: `benchmarks/bench_cortex.py --lora-products`). One neuron's
answers are thus exactly what that neuron computes alone with mlx-lm's LoRA layer.

`AdapterSlots` loads a registry version into a free slot (sha256-checked once, shapes checked against the base),
keeps loaded versions within a memory budget and evicts the least recently used one that no request is using.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from conch_dna.cortex.registry import AdapterMismatchError, NeuronVersion

BASE_SLOT = 0


class RowSlots:
    """The slot of each row of the batch being computed, shared by every `MultiLoRALinear` of a model."""

    def __init__(self):
        self.slots: mx.array | None = None  # int32 [rows]; None: every row on the bare base
        self.single: int | None = BASE_SLOT  # the one slot all rows share, if they do (a cheaper product)


def linear_dims(linear: nn.Module) -> tuple[int, int]:
    """(input, output) features of a Linear or QuantizedLinear."""
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return in_dims, out_dims


class MultiLoRALinear(nn.Module):
    """A linear layer plus one LoRA update per slot; each row of the input uses its row's slot."""

    def __init__(self, linear: nn.Module, rows: RowSlots, slots: int, rank: int):
        super().__init__()
        self.linear = linear
        self.rows = rows
        self.in_dims, self.out_dims = linear_dims(linear)
        self.lora_a = mx.zeros((slots, self.in_dims, rank))
        self.lora_b = mx.zeros((slots, rank, self.out_dims))  # the adapter's scale already multiplied in
        self._cast: dict = {}  # the stacks in a compute dtype, made once per dtype rather than every step

    def resize(self, slots: int, rank: int) -> None:
        """Room for `slots` adapters of rank up to `rank` (zero padding changes no product)."""
        s, _, r = self.lora_a.shape
        if (slots, rank) == (s, r):
            return
        a = mx.zeros((slots, self.in_dims, rank))
        b = mx.zeros((slots, rank, self.out_dims))
        a[: min(s, slots), :, :r] = self.lora_a[:slots]
        b[: min(s, slots), :r, :] = self.lora_b[:slots]
        self.lora_a, self.lora_b = a, b
        self._cast.clear()

    def put(self, slot: int, a: mx.array | None, b: mx.array | None, scale: float) -> None:
        """Write one adapter's matrices into `slot` (None: this adapter leaves the layer alone)."""
        self.lora_a[slot] = 0
        self.lora_b[slot] = 0
        if a is not None:
            r = a.shape[1]
            self.lora_a[slot, :, :r] = a.astype(self.lora_a.dtype)
            self.lora_b[slot, :r, :] = (scale * b).astype(self.lora_b.dtype)
        self._cast.clear()

    def stacks(self, dtype) -> tuple[mx.array, mx.array]:
        """A and B in `dtype`, as the trainer's LoRA layer casts them before multiplying."""
        if dtype not in self._cast:
            self._cast[dtype] = (self.lora_a.astype(dtype), self.lora_b.astype(dtype))
            mx.eval(self._cast[dtype])
        return self._cast[dtype]

    def __call__(self, x):
        y = self.linear(x)
        single, slots = self.rows.single, self.rows.slots
        if single == BASE_SLOT:
            return y
        a, b = self.stacks(x.dtype)
        if single is not None:
            z = (x @ a[single]) @ b[single]
        else:
            z = mx.gather_mm(mx.gather_mm(x, a, rhs_indices=slots), b, rhs_indices=slots)
        return y + z.astype(x.dtype)


@dataclass
class LoadedAdapter:
    version: NeuronVersion
    slot: int
    nbytes: int
    users: int = 0  # requests decoding with it now: never evicted while > 0


def read_adapter(folder: Path) -> tuple[dict[str, tuple[mx.array, mx.array]], float, int]:
    """An mlx-lm LoRA adapter folder: ({module path: (A, B)}, scale, bytes)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise AdapterMismatchError(f"{folder}: CORTEX serves LoRA adapters, not {kind!r}")
    scale = float(config.get("lora_parameters", {}).get("scale", 20.0))  # mlx-lm's default scale
    weights = mx.load(str(folder / "adapters.safetensors"))
    pairs: dict[str, tuple[mx.array, mx.array]] = {}
    for key in weights:
        if key.endswith(".lora_a"):
            path = key[: -len(".lora_a")]
            if path + ".lora_b" not in weights:
                raise AdapterMismatchError(f"{folder}: {key} has no lora_b beside it")
            pairs[path] = (weights[key], weights[path + ".lora_b"])
    if not pairs or len(pairs) * 2 != len(weights):
        raise AdapterMismatchError(f"{folder}: adapters.safetensors holds tensors that are not LoRA pairs")
    return pairs, scale, sum(v.nbytes for v in weights.values())


class AdapterSlots:
    """The adapters loaded on a model, one per slot, within `budget_bytes`; least recently used evicted first."""

    def __init__(self, model: nn.Module, verify, *, budget_bytes: int = 256 << 20, max_slots: int = 64):
        self.model = model
        self.verify = verify  # NeuronVersion -> its folder, every file sha256-checked
        self.budget_bytes = budget_bytes
        self.max_slots = max_slots
        self.rows = RowSlots()
        self.loaded: OrderedDict[tuple[str, int], LoadedAdapter] = OrderedDict()  # least recently used first
        self.layers: dict[str, MultiLoRALinear] = {}
        self.capacity, self.rank = 2, 1  # slots and rank the stacks have room for now

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.loaded.values())

    def acquire(self, version: NeuronVersion) -> int | None:
        """The slot serving `version` for one more request (loaded now if needed), or None while the budget is
        full of adapters in use (ask again when a request has finished)."""
        key = (version.neuron, version.version)
        entry = self.loaded.get(key)
        if entry is None:
            pairs, scale, nbytes = read_adapter(self.verify(version))
            slot = self._free_slot(nbytes)
            if slot is None:
                return None
            self._write(slot, pairs, scale)
            entry = self.loaded[key] = LoadedAdapter(version, slot, nbytes)
        self.loaded.move_to_end(key)
        entry.users += 1
        return entry.slot

    def release(self, version: NeuronVersion) -> None:
        entry = self.loaded.get((version.neuron, version.version))
        if entry is not None:
            entry.users -= 1

    def _free_slot(self, nbytes: int) -> int | None:
        while self.loaded and (self.nbytes + nbytes > self.budget_bytes or len(self.loaded) + 1 >= self.max_slots):
            idle = next((k for k, a in self.loaded.items() if a.users == 0), None)
            if idle is None:
                return None
            del self.loaded[idle]  # its slot is rewritten by the next adapter loaded into it
        used = {a.slot for a in self.loaded.values()}
        return next(s for s in range(BASE_SLOT + 1, self.max_slots) if s not in used)

    def _write(self, slot: int, pairs: dict, scale: float) -> None:
        modules = dict(self.model.named_modules())
        for path, (a, b) in pairs.items():
            layer = self.layers[path] if path in self.layers else modules.get(path)
            if isinstance(layer, MultiLoRALinear):
                dims = (layer.in_dims, layer.out_dims)
            elif isinstance(layer, nn.Linear | nn.QuantizedLinear):
                dims = linear_dims(layer)
            else:
                raise AdapterMismatchError(f"the adapter adapts {path}, which the base model has no linear layer at")
            if a.shape[0] != dims[0] or b.shape[1] != dims[1] or a.shape[1] != b.shape[0]:
                raise AdapterMismatchError(f"the adapter's {path} is {a.shape[0]}x{b.shape[1]} (rank {a.shape[1]}); the "
                                           f"base model's layer is {dims[0]}x{dims[1]}: it was trained on another base")
        rank = max(self.rank, *(a.shape[1] for a, _ in pairs.values()))
        capacity = max(self.capacity, slot + 1)
        for path in pairs:
            if path not in self.layers:
                self.layers[path] = MultiLoRALinear(modules[path], self.rows, capacity, rank)
                self._replace(path, self.layers[path])
        for path, layer in self.layers.items():
            layer.resize(capacity, rank)
            a, b = pairs.get(path, (None, None))
            layer.put(slot, a, b, scale)
        self.capacity, self.rank = capacity, rank
        mx.eval([(layer.lora_a, layer.lora_b) for layer in self.layers.values()])

    def _replace(self, path: str, layer: nn.Module) -> None:
        *parents, name = path.split(".")
        parent = self.model
        for p in parents:
            parent = parent[int(p)] if p.isdigit() else getattr(parent, p)
        if name.isdigit():
            parent[int(name)] = layer
        else:
            setattr(parent, name, layer)
