"""Load PEFT LoRA directories (adapter_config.json + adapter_model.safetensors) into CPU tensors.

Everything that batchgen cannot apply exactly is refused here, at engine start, with a message
naming the adapter: other PEFT methods, DoRA, LoRA biases, modules_to_save, embeddings / lm_head
targets, ranks above max_lora_rank, shapes that do not fit the base model.

Checkpoints that store a projection fused (Phi-3's `qkv_proj` and `gate_up_proj`) get adapters on
the fused module: one A [r, in] and one B [out_1 + out_2 (+ out_3), r]. Since
x A^T B^T = concat_k(x A^T B_k^T) over the row blocks B_k of B, such a pair is exactly the same A
with each B_k on target k: it is stored as the per-target pairs (q/k/v, gate/up) every model uses.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

# HF projection name -> (our fused module, index of its output slice)
TARGETS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}
# A fused checkpoint projection (Phi-3) -> the targets its output concatenates, in order
FUSED_TARGETS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
TARGET_NAMES = tuple(TARGETS) + tuple(FUSED_TARGETS)

# Config switches that change what the adapter computes; batchgen refuses them rather than ignore them.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "use_qalora": "QALoRA (use_qalora)",
    "layer_replication": "layer_replication",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "use_bdlora",
}

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.*?)\.lora_(?P<ab>A|B)(?:\.[^.]+)?\.weight$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.([a-z_]+)$")


class AdapterError(ValueError):
    pass


@dataclass
class ProjectionDims:
    """in/out features of every LoRA-able projection of the base model, and its number of layers."""
    num_layers: int
    dims: dict[str, tuple[int, int]]  # HF target name -> (in_features, out_features)

    @classmethod
    def of_model(cls, model) -> ProjectionDims:
        attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
        hidden = attn.qkv_proj.in_features
        dims = {"q_proj": (hidden, attn.q_size), "k_proj": (hidden, attn.kv_size), "v_proj": (hidden, attn.kv_size),
                "o_proj": (attn.q_size, attn.o_proj.out_features)}
        if getattr(model, "lora_mlp", True):  # False for mixture-of-experts models: attention only
            inter = mlp.down_proj.in_features
            dims.update({"gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                         "down_proj": (inter, mlp.down_proj.out_features)})
        return cls(len(model.layers), dims)


@dataclass
class LoRAAdapter:
    name: str
    path: str
    rank: int  # largest rank over its modules
    targets: set[str]  # HF target names it changes in at least one layer
    # (layer, HF target) -> (A [r, in], B [out, r], scale); CPU tensors as saved
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = field(repr=False)


def load_adapter(name: str, path: str, dims: ProjectionDims, max_rank: int) -> LoRAAdapter:
    """Read and validate one PEFT LoRA directory. Raises AdapterError naming the adapter."""

    def fail(msg: str) -> AdapterError:
        return AdapterError(f"LoRA adapter {name!r} ({path}): {msg}")

    path = os.path.expanduser(str(path))
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise fail("no adapter_config.json (expected a PEFT adapter directory from save_pretrained)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise fail(f"unreadable adapter_config.json: {e}") from None
    if not isinstance(cfg, dict):
        raise fail("adapter_config.json is not a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise fail(f"peft_type {peft_type!r} is not supported (only LORA)")
    for key, what in _UNSUPPORTED_FLAGS.items():
        if cfg.get(key):
            raise fail(f"{what} is not supported")
    if cfg.get("bias", "none") != "none":
        raise fail(f"bias={cfg['bias']!r} is not supported (only 'none')")
    if cfg.get("fan_in_fan_out"):
        raise fail("fan_in_fan_out=true (Conv1D-style weights) is not supported")
    declared = cfg.get("target_modules")
    if isinstance(declared, (list, tuple)):
        bad = sorted(str(t) for t in declared if str(t).split(".")[-1] not in TARGET_NAMES)
        if bad:
            raise fail(f"targets {bad}, which batchgen cannot apply; supported: {', '.join(TARGET_NAMES)}")
        names = {str(t).split(".")[-1] for t in declared}
        _check_mixture_of_experts(sorted({p for t in names for p in FUSED_TARGETS.get(t, (t,))}), dims, fail)

    tensors = _read_tensors(path, fail)
    alpha = cfg.get("lora_alpha", 8)
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora", False))

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            kind = "embedding LoRA" if "lora_embedding" in key else "a tensor that is not a LoRA A/B weight"
            raise fail(f"{key!r} is {kind}; batchgen applies LoRA to {', '.join(TARGET_NAMES)} only")
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor

    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
    for module, ab in sorted(pairs.items()):
        lm = _LAYER.search(module)
        if lm is None or lm[2] not in TARGET_NAMES:
            raise fail(f"targets module {module!r}, which batchgen cannot apply; "
                       f"supported: {', '.join(TARGET_NAMES)} of the decoder layers")
        layer, target = int(lm[1]), lm[2]
        parts = FUSED_TARGETS.get(target, (target,))
        _check_mixture_of_experts(list(parts), dims, fail)
        if layer >= dims.num_layers:
            raise fail(f"{module!r} is layer {layer}, but the base model has {dims.num_layers} layers")
        if set(ab) != {"A", "B"}:
            raise fail(f"{module!r} has lora_{'A' if 'A' in ab else 'B'} but no lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2:
            raise fail(f"{module!r}: LoRA weights must be matrices, got A {tuple(a.shape)}, B {tuple(b.shape)}")
        r = a.shape[0]
        in_f, outs = dims.dims[parts[0]][0], [dims.dims[t][1] for t in parts]
        out_f = sum(outs)
        if a.shape[1] != in_f or b.shape[0] != out_f or b.shape[1] != r:
            split = f" (= {' + '.join(map(str, outs))}: {', '.join(parts)})" if len(parts) > 1 else ""
            raise fail(f"{module!r}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the base model's "
                       f"{target} ({in_f} -> {out_f}{split}): expected A [r, {in_f}] and B [{out_f}, r]")
        if r > max_rank:
            raise fail(f"{module!r} has rank {r}, more than max_lora_rank={max_rank}")
        if r == 0:
            continue
        short = module.removeprefix("base_model.model.")
        mod_alpha = alpha_pattern.get(_pattern_key(alpha_pattern, short), alpha)
        scale = mod_alpha / (math.sqrt(r) if rslora else r)
        for part, b_part in zip(parts, b.split(outs)):  # a fused B: its row block per target
            if (layer, part) in weights:
                raise fail(f"{module!r}: layer {layer}'s {part} is targeted twice (fused and on its own)")
            weights[(layer, part)] = (a, b_part, float(scale))
    if not weights:
        raise fail("contains no LoRA weights")
    return LoRAAdapter(name, path, max(a.shape[0] for a, _, _ in weights.values()),
                       {t for _, t in weights}, weights)


def _check_mixture_of_experts(targets: list[str], dims: ProjectionDims, fail) -> None:
    bad = [t for t in targets if t in TARGETS and t not in dims.dims]
    if bad:
        raise fail(f"targets {bad}, but the base model's MLP is a mixture of experts, where batchgen applies "
                   f"LoRA to the attention projections only ({', '.join(dims.dims)})")


def load_adapters(adapters: dict[str, str], dims: ProjectionDims, max_rank: int) -> dict[str, LoRAAdapter]:
    return {name: load_adapter(name, path, dims, max_rank) for name, path in adapters.items()}


def _pattern_key(patterns: dict, key: str) -> str:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def _read_tensors(path: str, fail) -> dict[str, torch.Tensor]:
    st = os.path.join(path, "adapter_model.safetensors")
    bin_path = os.path.join(path, "adapter_model.bin")
    try:
        if os.path.isfile(st):
            from safetensors.torch import load_file

            return load_file(st, device="cpu")
        if os.path.isfile(bin_path):
            return torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt file is this adapter's problem: say which
        raise fail(f"unreadable weights: {e}") from None
    raise fail("no adapter_model.safetensors (or adapter_model.bin)")
