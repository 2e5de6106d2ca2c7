"""lemma: a compact decode engine for Llama/Qwen-style models that makes long reasoning cheap."""

from lemma.engine.engine import Engine
from lemma.engine.policies import H2O, Dense, Policy, Quest, RaaS, RaaSCapped, RandomEviction, StreamingLLM, make_policy
from lemma.engine.sampler import SamplingParams
from lemma.engine.sequence import Chunk, Output, Stats
from lemma.errors import LemmaError

__all__ = ["Engine", "SamplingParams", "Output", "Chunk", "Stats", "LemmaError",
           "Policy", "Dense", "RaaS", "StreamingLLM", "H2O", "Quest", "RaaSCapped", "RandomEviction", "make_policy"]
__version__ = "0.1.0"
