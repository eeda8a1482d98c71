"""Choose the model class by `config.architectures`."""

from __future__ import annotations

from torch import nn

from batchgen.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from batchgen.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from batchgen.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from batchgen.models.phi3 import Phi3ForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,  # its language model (engine reads text_config)
}


# Configs converted from GGUF carry no `architectures`, only `model_type`.
MODEL_TYPES = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM,
               "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM,
               "mixtral": MixtralForCausalLM, "qwen2_moe": Qwen2MoeForCausalLM,
               "gemma2": Gemma2ForCausalLM, "gemma3_text": Gemma3ForCausalLM,
               "phi3": Phi3ForCausalLM}


def model_class(config) -> type[nn.Module]:
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in MODELS:
            return MODELS[arch]
    if not archs and getattr(config, "model_type", None) in MODEL_TYPES:
        return MODEL_TYPES[config.model_type]
    raise ValueError(f"unsupported architecture {getattr(config, 'architectures', None)}; "
                     f"batchgen supports {', '.join(MODELS)}")


def language_model_config(config):
    """A multimodal config (Gemma3ForConditionalGeneration: the text model in `text_config`) as its
    language model's config, keeping `architectures` so the registry picks the text model; any other
    config as it is."""
    text = getattr(config, "text_config", None)
    archs = getattr(config, "architectures", None) or []
    if text is None or not any(a.endswith("ForConditionalGeneration") for a in archs):
        return config
    text.architectures = list(archs)
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(text, key, None) is None and getattr(config, key, None) is not None:
            setattr(text, key, getattr(config, key))
    return text
