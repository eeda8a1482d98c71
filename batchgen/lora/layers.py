"""The LoRA compute: stacked slot tensors on the device and the delta over a mixed batch.

Per target projection t (q/k/v/o/gate/up/down) and layer, the device holds
    A[t]  [layers, slots, max_rank, in]      B[t]  [layers, slots, out, max_rank]   (B pre-scaled)
zero past each adapter's rank, so a slot is a plain stack entry. `load(slot, adapter)` fills one
slot from the adapter's CPU copy (the others wait there).

Per step the runner calls `load_pending(sched.lora_loads)`, then `set_batch(...)` for the forward: the
batch is cut into segments of consecutive tokens with the same slot (the scheduler orders rows by slot, so there
are few). The model calls `LayerLoRA(x, y, projection)` right after each fused projection; for every
target of that projection, each token with an adapter gets
    y[:, slice(t)] += (x @ A[t][slot]^T) @ B[t][slot]^T
in one pass over the mixed batch (never a batch per adapter): grouped torch matmuls on CPU, the
SGMV shrink/expand Triton kernels (kernels/lora_shrink_expand.py) on CUDA.
"""

from __future__ import annotations

import torch

from batchgen.lora.adapters import TARGETS, LoRAAdapter, ProjectionDims

# fused projection of the model -> its targets, in output order
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
         "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class LoRABatch:
    """Where the adapters sit in this forward's flat token batch."""

    def __init__(self, row_tokens: list[int], row_slots: list[int], device: torch.device, use_triton: bool):
        seg_starts, seg_slots, tok = [0], [], 0
        for n, slot in zip(row_tokens, row_slots):
            if seg_slots and seg_slots[-1] == slot:
                seg_starts[-1] = tok + n
            else:
                seg_slots.append(slot)
                seg_starts.append(tok + n)
            tok += n
        self.num_tokens = tok
        self.active = any(s >= 0 for s in seg_slots)
        # torch path: (slot, token slice) per slot. When some slot's tokens are not one run (the
        # runner may order rows by context length), `perm` gathers the adapter tokens grouped by
        # slot and the slices index that gathered order instead.
        by_slot: dict[int, list[tuple[int, int]]] = {}
        for i, slot in enumerate(seg_slots):
            if slot >= 0:
                by_slot.setdefault(slot, []).append((seg_starts[i], seg_starts[i + 1]))
        self.groups: list[tuple[int, slice]] = []
        self.perm: torch.Tensor | None = None  # [adapter tokens] token index, grouped by slot
        if not use_triton:
            if all(len(segs) == 1 for segs in by_slot.values()):
                self.groups = [(slot, slice(*segs[0])) for slot, segs in by_slot.items()]
            else:
                perm, at = [], 0
                for slot, segs in by_slot.items():
                    n = sum(e - s for s, e in segs)
                    perm.extend(t for s, e in segs for t in range(s, e))
                    self.groups.append((slot, slice(at, at + n)))
                    at += n
                self.perm = torch.tensor(perm, dtype=torch.long).to(device, non_blocking=True)
        # Triton path: the SGMV segment arrays
        self.seg_starts = torch.tensor(seg_starts, dtype=torch.int32).to(device, non_blocking=True)
        self.seg_slots = torch.tensor(seg_slots, dtype=torch.int32).to(device, non_blocking=True)
        self.max_seg_len = max((seg_starts[i + 1] - seg_starts[i] for i, s in enumerate(seg_slots) if s >= 0),
                               default=0)


class LoRAWeights:
    """The device-side slots of every adapter-able projection, and the per-layer delta."""

    def __init__(self, model, adapters: dict[str, LoRAAdapter], num_slots: int, dtype: torch.dtype,
                 device: torch.device, use_triton: bool | None = None):
        self.adapters = adapters
        self.num_slots = num_slots
        self.dtype, self.device = dtype, device
        self.use_triton = device.type == "cuda" if use_triton is None else use_triton
        dims = ProjectionDims.of_model(model)
        self.num_layers = dims.num_layers
        self.max_rank = max(a.rank for a in adapters.values())
        targets = sorted({t for a in adapters.values() for t in a.targets}, key=list(TARGETS).index)
        # Only the projections some adapter targets get slot tensors.
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        for t in targets:
            in_f, out_f = dims.dims[t]
            self.A[t] = torch.zeros(self.num_layers, num_slots, self.max_rank, in_f, dtype=dtype, device=device)
            self.B[t] = torch.zeros(self.num_layers, num_slots, out_f, self.max_rank, dtype=dtype, device=device)
        self.ranks = {t: [0] * num_slots for t in targets}  # per target, rank of each slot's adapter (0: none)
        self._ranks_dev = {t: torch.zeros(num_slots, dtype=torch.int32, device=device) for t in targets}
        # Output slices of each target inside its fused projection.
        self.slices: dict[str, list[tuple[str, int, int]]] = {}
        for fused, names in FUSED.items():
            offset = 0
            for name in names:
                out_f = dims.dims[name][1]
                if name in self.A:
                    self.slices.setdefault(fused, []).append((name, offset, out_f))
                offset += out_f
        self._packed = {name: self._pack(a) for name, a in adapters.items()}
        self.slot_adapter: list[str | None] = [None] * num_slots
        self.batch: LoRABatch | None = None
        self.num_loads = 0
        self._attach(model)

    # ---- set-up ---------------------------------------------------------------------------------

    def _pack(self, adapter: LoRAAdapter) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
        """The adapter as CPU tensors in the device layout of one slot: per target
        A [layers, r, in] and B [layers, out, r] (B scaled), r = its largest rank for that target."""
        packed = {}
        for t in self.A:
            mods = {layer: w for (layer, target), w in adapter.weights.items() if target == t}
            if not mods:
                continue
            r = max(a.shape[0] for a, _, _ in mods.values())
            a_pack = torch.zeros(self.num_layers, r, self.A[t].shape[-1], dtype=self.dtype)
            b_pack = torch.zeros(self.num_layers, self.B[t].shape[-2], r, dtype=self.dtype)
            for layer, (a, b, scale) in mods.items():
                a_pack[layer, :a.shape[0]] = a.float()
                b_pack[layer, :, :b.shape[1]] = b.float() * scale
            if self.device.type == "cuda":
                a_pack, b_pack = a_pack.pin_memory(), b_pack.pin_memory()
            packed[t] = (a_pack, b_pack, r)
        return packed

    def _attach(self, model) -> None:
        for i, layer in enumerate(model.layers):
            hook = LayerLoRA(self, i)
            layer.self_attn.lora = hook
            layer.mlp.lora = hook

    # ---- per step -------------------------------------------------------------------------------

    def load(self, slot: int, name: str) -> None:
        """Put adapter `name` into `slot` (replacing whatever was there)."""
        packed = self._packed[name]
        for t in self.A:
            if t in packed:
                a, b, r = packed[t]
                self.A[t][:, slot, :r].copy_(a, non_blocking=True)
                self.A[t][:, slot, r:].zero_()
                self.B[t][:, slot, :, :r].copy_(b, non_blocking=True)
                self.B[t][:, slot, :, r:].zero_()
            else:
                r = 0
                self.A[t][:, slot].zero_()
                self.B[t][:, slot].zero_()
            self.ranks[t][slot] = r
            self._ranks_dev[t][slot] = r
        self.slot_adapter[slot] = name
        self.num_loads += 1

    def load_pending(self, loads: list[tuple[int, str]]) -> None:
        """Load the (slot, adapter) assignments the scheduler made for this step."""
        for slot, name in loads:
            self.load(slot, name)

    def set_batch(self, row_tokens: list[int], row_slots: list[int]) -> None:
        """Map this forward's flat batch (rows in batch order: tokens, slot) to adapter segments."""
        if all(s < 0 for s in row_slots):
            self.batch = None  # base-model rows only: no LoRA work at all
        else:
            self.batch = LoRABatch(row_tokens, row_slots, self.device, self.use_triton)

    # ---- compute --------------------------------------------------------------------------------

    def apply(self, layer: int, projection: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [tokens, out of the fused projection] += the LoRA delta of every target in it; returns y."""
        batch = self.batch
        if batch is None or not batch.active:
            return y
        if batch.num_tokens != x.shape[0]:
            raise RuntimeError(f"LoRA batch maps {batch.num_tokens} tokens, the forward has {x.shape[0]}: "
                               "call set_batch() for every forward of a model with adapters")
        xs = None
        for target, offset, size in self.slices.get(projection, ()):
            a, b = self.A[target][layer], self.B[target][layer]  # [slots, R, in], [slots, out, R]
            y_t = y if size == y.shape[1] else y.narrow(1, offset, size)
            if self.use_triton:
                from kernels.lora_shrink_expand import lora_expand, lora_shrink

                ranks = self._ranks_dev[target]
                h = lora_shrink(x, a, batch.seg_starts, batch.seg_slots, ranks, max_seg_len=batch.max_seg_len)
                lora_expand(h, b, y_t, batch.seg_starts, batch.seg_slots, ranks, max_seg_len=batch.max_seg_len)
                continue
            ranks = self.ranks[target]
            if batch.perm is None:  # each slot's tokens are one run: in place on views of y
                for slot, rows in batch.groups:
                    r = ranks[slot]
                    if r:
                        y_t[rows].addmm_(x[rows] @ a[slot, :r].T, b[slot, :, :r].T)
                continue
            if xs is None:
                xs = x.index_select(0, batch.perm)  # [adapter tokens, in], grouped by slot; shared by targets
            delta = torch.empty(xs.shape[0], size, dtype=y.dtype, device=y.device)
            for slot, rows in batch.groups:
                r = ranks[slot]
                if r:
                    torch.mm(xs[rows] @ a[slot, :r].T, b[slot, :, :r].T, out=delta[rows])
                else:
                    delta[rows].zero_()
            y_t.index_add_(0, batch.perm, delta)
        return y


class LayerLoRA:
    """What a decoder layer's attention and MLP call after each fused projection: `y = lora(x, y, name)`."""

    __slots__ = ("layer", "weights")

    def __init__(self, weights: LoRAWeights, layer: int):
        self.weights = weights
        self.layer = layer

    def __call__(self, x: torch.Tensor, y: torch.Tensor, projection: str) -> torch.Tensor:
        return self.weights.apply(self.layer, projection, x, y)
