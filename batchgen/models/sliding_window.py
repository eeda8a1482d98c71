"""Which layers of a model attend over a sliding window, read from its transformers config."""

from __future__ import annotations


def layer_windows(config) -> list[int]:
    """Per layer: the sliding-window size (keys at positions > pos - window), or 0 for full attention.

    `layer_types` (transformers 5: "sliding_attention" / "full_attention") decides where a config has
    it (Qwen2's max_window_layers, Gemma's interleaving); otherwise a `sliding_window` applies to
    every layer (Mistral v0.1, Mixtral) unless `use_sliding_window` is false (Qwen2/Qwen3 configs).
    """
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or 0
    if not window or getattr(config, "use_sliding_window", True) is False:
        return [0] * n
    types = getattr(config, "layer_types", None)
    if types:
        if len(types) != n:
            raise ValueError(f"config.layer_types has {len(types)} entries for {n} layers")
        return [int(window) if t == "sliding_attention" else 0 for t in types]
    return [int(window)] * n
