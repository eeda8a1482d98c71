"""The LoRA compute: stacked slot tensors on the device and the delta over a mixed batch.

`load(slot, adapter)` fills one slot from the adapter's CPU copy (the others wait there). Per step
the runner calls `load_pending(sched.lora_loads)`, then `set_batch(...)` for the forward: the batch is
cut into segments of consecutive tokens with the same slot. The model calls `LayerLoRA(x, y, projection)`
right after each fused projection; every token with an adapter gets, for every target t of it,
    y[:, slice(t)] += (x @ A[t][slot]^T) @ B[t][slot]^T
in one pass over the mixed batch (never a batch per adapter). Two layouts, one per device kind:

- CUDA (SGMV Triton kernels, kernels/lora_shrink_expand.py): per target t
  A[t] [layers, slots, max_rank, in], B[t] [layers, slots, out, max_rank] (B pre-scaled).
- CPU: per fused projection f, the A of its targets stacked, A[f] [layers, slots, R_f, in]
  (R_f = max_rank per target of f), and per target t
  B[t] [layers, slots, max_rank, out] (B pre-scaled). The step's adapter tokens are gathered into a
  padded [slots, tokens per slot, in] batch: one bmm shrinks all of f's targets for every slot at
  once, one bmm per target expands, and an index_add puts each target's delta back. Where the C++
  kernel builds (kernels/cpu_lora.py), it does all of that per fused projection in one call
  instead: as torch ops those are dozens of tiny calls per layer whose fixed costs exceed the math.

Either way ranks past an adapter's own are zero, so a slot is a plain stack entry.
"""

from __future__ import annotations

import torch

from batchgen.kernels.cpu_lora import load as load_cpu_lora
from batchgen.kernels.cpu_lora import lora_delta_
from batchgen.lora.adapters import TARGETS, LoRAAdapter, ProjectionDims

# fused projection of the model -> its targets, in output order
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
         "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class LoRABatch:
    """Where the adapters sit in this forward's flat token batch."""

    def __init__(self, row_tokens: list[int], row_slots: list[int], device: torch.device, path: str):
        """path: "triton" (SGMV segments), "kernel" (the C++ kernel: a slot per token) or "torch"."""
        self.num_tokens = sum(row_tokens)
        if path == "kernel":  # the slot of every token (-1: base model)
            self.token_slots = torch.tensor(row_slots).repeat_interleave(torch.tensor(row_tokens))
            return
        seg_starts, seg_slots, tok = [0], [], 0  # runs of consecutive tokens with one slot
        for n, slot in zip(row_tokens, row_slots):
            if seg_slots and seg_slots[-1] == slot:
                seg_starts[-1] = tok + n
            else:
                seg_slots.append(slot)
                seg_starts.append(tok + n)
            tok += n
        if path == "triton":
            self.seg_starts = torch.tensor(seg_starts, dtype=torch.int32).to(device, non_blocking=True)
            self.seg_slots = torch.tensor(seg_slots, dtype=torch.int32).to(device, non_blocking=True)
            self.max_seg_len = max((seg_starts[i + 1] - seg_starts[i] for i, s in enumerate(seg_slots) if s >= 0),
                                   default=0)
            return
        # CPU torch path: the adapter tokens grouped by slot into a padded [len(slots), per_slot] batch: `src`
        # are their token indices, `dst` their places in the padded batch (row-major).
        by_slot: dict[int, list[int]] = {}
        for i, slot in enumerate(seg_slots):
            if slot >= 0:
                by_slot.setdefault(slot, []).extend(range(seg_starts[i], seg_starts[i + 1]))
        self.slots = sorted(by_slot)
        self.per_slot = max((len(t) for t in by_slot.values()), default=0)
        src = [t for slot in self.slots for t in by_slot[slot]]
        dst = [k * self.per_slot + j for k, slot in enumerate(self.slots) for j in range(len(by_slot[slot]))]
        self.src = torch.tensor(src, dtype=torch.long).to(device, non_blocking=True)
        self.dst = torch.tensor(dst, dtype=torch.long).to(device, non_blocking=True)
        self.slot_index = torch.tensor(self.slots, dtype=torch.long).to(device, non_blocking=True)


class LoRAWeights:
    """The device-side slots of every adapter-able projection, and the per-layer delta."""

    def __init__(self, model, adapters: dict[str, LoRAAdapter], num_slots: int, dtype: torch.dtype,
                 device: torch.device, use_triton: bool | None = None):
        self.adapters = tuple(adapters)  # names; the weights live on in `_packed`
        self.num_slots = num_slots
        self.device = device
        self.use_triton = device.type == "cuda" if use_triton is None else use_triton
        self.use_cpu_kernel = not self.use_triton and device.type == "cpu" and load_cpu_lora() is not None
        self.dtype = dtype
        dims = ProjectionDims.of_model(model)
        self.num_layers = dims.num_layers
        self.max_rank = max(a.rank for a in adapters.values())
        targets = sorted({t for a in adapters.values() for t in a.targets}, key=list(TARGETS).index)
        # Output slices of each target inside its fused projection; only targeted projections count.
        self.slices: dict[str, list[tuple[str, int, int]]] = {}
        for fused, names in FUSED.items():
            offset = 0
            for name in names:
                if name not in dims.dims:  # an MLP of experts: no LoRA there (ProjectionDims.of_model)
                    continue
                out_f = dims.dims[name][1]
                if name in targets:
                    self.slices.setdefault(fused, []).append((name, offset, out_f))
                offset += out_f
        L, S, R = self.num_layers, num_slots, self.max_rank
        self.A: dict[str, torch.Tensor] = {}  # keyed by target (CUDA) or fused projection (CPU)
        self.B: dict[str, torch.Tensor] = {}
        if self.use_triton:
            for t in targets:
                in_f, out_f = dims.dims[t]
                self.A[t] = torch.zeros(L, S, R, in_f, dtype=self.dtype, device=device)
                self.B[t] = torch.zeros(L, S, out_f, R, dtype=self.dtype, device=device)
            self._ranks_dev = {t: torch.zeros(S, dtype=torch.int32, device=device) for t in targets}  # per slot
        else:
            for fused, parts in self.slices.items():
                in_f = dims.dims[parts[0][0]][0]
                self.A[fused] = torch.zeros(L, S, R * len(parts), in_f, dtype=self.dtype, device=device)
                for t, _, out_f in parts:
                    self.B[t] = torch.zeros(L, S, R, out_f, dtype=self.dtype, device=device)
        self.targets = targets
        self._packed = {name: self._pack(a) for name, a in adapters.items()}
        self.batch: LoRABatch | None = None
        self.reduce = None  # tensor parallel: sums o/down deltas over the ranks (each has its input slice)
        self._attach(model)

    # ---- set-up ---------------------------------------------------------------------------------

    def _pack(self, adapter: LoRAAdapter) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
        """The adapter as CPU tensors, per target A [layers, r, in] and B [layers, out, r] (B scaled),
        r = its largest rank for that target."""
        packed = {}
        for t in self.targets:
            mods = {layer: w for (layer, target), w in adapter.weights.items() if target == t}
            if not mods:
                continue
            r = max(a.shape[0] for a, _, _ in mods.values())
            in_f, out_f = next(iter(mods.values()))[0].shape[1], next(iter(mods.values()))[1].shape[0]
            a_pack = torch.zeros(self.num_layers, r, in_f, dtype=self.dtype)
            b_pack = torch.zeros(self.num_layers, out_f, r, dtype=self.dtype)
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
        if self.use_triton:
            for t in self.A:
                a, b, r = packed.get(t, (None, None, 0))
                self.A[t][:, slot].zero_()
                self.B[t][:, slot].zero_()
                if r:
                    self.A[t][:, slot, :r].copy_(a, non_blocking=True)
                    self.B[t][:, slot, :, :r].copy_(b, non_blocking=True)
                self._ranks_dev[t][slot] = r
        else:
            for fused, parts in self.slices.items():
                self.A[fused][:, slot].zero_()
                for k, (t, _, _) in enumerate(parts):
                    a, b, r = packed.get(t, (None, None, 0))
                    self.B[t][:, slot].zero_()
                    if r:  # target k's A: rank rows k*R .. k*R + r of the fused A
                        self.A[fused][:, slot, k * self.max_rank:k * self.max_rank + r].copy_(a)
                        self.B[t][:, slot, :r].copy_(b.transpose(1, 2))

    def load_pending(self, loads: list[tuple[int, str]]) -> None:
        """Load the (slot, adapter) assignments the scheduler made for this step."""
        for slot, name in loads:
            self.load(slot, name)

    def set_batch(self, row_tokens: list[int], row_slots: list[int]) -> None:
        """Map this forward's flat batch (rows in batch order: tokens, slot) to adapter segments."""
        if all(s < 0 for s in row_slots):
            self.batch = None  # base-model rows only: no LoRA work at all
        else:
            path = "triton" if self.use_triton else "kernel" if self.use_cpu_kernel else "torch"
            self.batch = LoRABatch(row_tokens, row_slots, self.device, path)

    # ---- compute --------------------------------------------------------------------------------

    def apply(self, layer: int, projection: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [tokens, out of the fused projection] += the LoRA delta of every target in it; returns y."""
        if self.reduce is not None and projection in ("o_proj", "down_proj") and self.batch is not None \
                and projection in self.slices:  # row-parallel: y is already summed, this rank's delta is not
            return y.add_(self.reduce(self._apply(layer, projection, x, torch.zeros_like(y))))
        return self._apply(layer, projection, x, y)

    def _apply(self, layer: int, projection: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = self.batch
        if batch is None or projection not in self.slices:
            return y
        if batch.num_tokens != x.shape[0]:
            raise RuntimeError(f"LoRA batch maps {batch.num_tokens} tokens, the forward has {x.shape[0]}: "
                               "call set_batch() for every forward of a model with adapters")
        if self.use_triton:
            from batchgen.kernels.lora_shrink_expand import lora_expand, lora_shrink

            for target, offset, size in self.slices[projection]:
                y_t = y if size == y.shape[1] else y.narrow(1, offset, size)
                ranks = self._ranks_dev[target]
                h = lora_shrink(x, self.A[target][layer], batch.seg_starts, batch.seg_slots, ranks,
                                max_seg_len=batch.max_seg_len)
                lora_expand(h, self.B[target][layer], y_t, batch.seg_starts, batch.seg_slots, ranks,
                            max_seg_len=batch.max_seg_len)
            return y
        if self.use_cpu_kernel:
            parts = self.slices[projection]
            lora_delta_(x, y, self.A[projection][layer], [self.B[t][layer] for t, _, _ in parts],
                        [offset for _, offset, _ in parts], batch.token_slots, self.max_rank)
            return y
        some_slots = len(batch.slots) != self.num_slots

        def slots_of(w: torch.Tensor) -> torch.Tensor:  # [slots, ...] of this layer, the batch's slots only
            return w.index_select(0, batch.slot_index) if some_slots else w

        n, per_slot, R = len(batch.slots), batch.per_slot, self.max_rank
        xs = x.new_zeros(n * per_slot, x.shape[1])  # [slots * per_slot, in]
        xs.index_copy_(0, batch.dst, x.index_select(0, batch.src))
        h = torch.bmm(xs.view(n, per_slot, -1), slots_of(self.A[projection][layer]).transpose(1, 2))  # [.., R_f]
        for k, (target, offset, size) in enumerate(self.slices[projection]):
            delta = torch.bmm(h[:, :, k * R:(k + 1) * R], slots_of(self.B[target][layer]))  # [slots, per_slot, out]
            y_t = y if size == y.shape[1] else y.narrow(1, offset, size)
            y_t.index_add_(0, batch.src, delta.view(n * per_slot, size).index_select(0, batch.dst))
        return y


class LayerLoRA:
    """What a decoder layer's attention and MLP call after each fused projection: `y = lora(x, y, name)`."""

    __slots__ = ("layer", "weights")

    def __init__(self, weights: LoRAWeights, layer: int):
        self.weights = weights
        self.layer = layer

    def __call__(self, x: torch.Tensor, y: torch.Tensor, projection: str) -> torch.Tensor:
        return self.weights.apply(self.layer, projection, x, y)
