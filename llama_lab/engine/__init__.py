"""The engine room: one thread owns a loaded model and decodes every request (no asyncio, no HTTP)."""

from llama_lab.engine.detokenizer import Detokenizer
from llama_lab.engine.engine import Completion, Delta, Engine, EngineClosed, EngineOverloaded, RequestHandle
from llama_lab.engine.sampling import SamplingParams

__all__ = ["Completion", "Delta", "Detokenizer", "Engine", "EngineClosed", "EngineOverloaded", "RequestHandle",
           "SamplingParams"]
