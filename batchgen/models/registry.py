"""Choose the model class by `config.architectures`."""

from __future__ import annotations

from torch import nn

from batchgen.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


# Configs converted from GGUF carry no `architectures`, only `model_type`.
MODEL_TYPES = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM,
               "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}


def model_class(config) -> type[nn.Module]:
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in MODELS:
            return MODELS[arch]
    if not archs and getattr(config, "model_type", None) in MODEL_TYPES:
        return MODEL_TYPES[config.model_type]
    raise ValueError(f"unsupported architecture {getattr(config, 'architectures', None)}; "
                     f"batchgen supports {', '.join(MODELS)}")
