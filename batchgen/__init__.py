"""batchgen: offline batch LLM inference."""

from batchgen.config import EngineConfig
from batchgen.sampling import CompletionOutput, RequestOutput, SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "Engine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput",
           "StructuredOutputsParams"]
__version__ = "0.1.0"


def __getattr__(name):  # torch loads on first use, so `batchgen --help` stays quick
    if name in ("LLM", "Engine"):
        from batchgen import engine
        return getattr(engine, name)
    raise AttributeError(name)
