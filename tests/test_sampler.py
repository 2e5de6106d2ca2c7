"""Sampler masks against a direct computation, seeds, penalties, and stop strings across tokens."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lemma import Engine, SamplingParams
from lemma.engine.sampler import (Sampler, apply_reply_penalties, apply_repetition_penalty, exponential_noise,
                                  filter_logits)


def direct_keep(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> set[int]:
    """The kept token set for one row, computed the slow obvious way."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i].item())
    kept = order[:top_k] if top_k > 0 else order
    probs = torch.softmax(torch.tensor([logits[i].item() for i in kept]), 0).tolist()
    out, mass = [], 0.0
    for i, p in zip(kept, probs):
        if mass >= top_p:
            break
        out.append((i, p))
        mass += p
    best = out[0][1]
    return {i for i, p in out if p >= min_p * best} | {order[0]}


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    top_k=st.integers(0, 12),
    top_p=st.floats(0.05, 1.0),
    min_p=st.floats(0.0, 0.5),
)
def test_filter_masks_match_direct_computation(seed, top_k, top_p, min_p):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(seed)) * 3
    masked = filter_logits(logits, torch.tensor([top_k] * 3), torch.tensor([top_p] * 3), torch.tensor([min_p] * 3))
    for row in range(3):
        kept = set(torch.nonzero(masked[row] > float("-inf")).flatten().tolist())
        assert kept == direct_keep(logits[row], top_k, top_p, min_p)
        assert torch.equal(masked[row][list(kept)], logits[row][list(kept)])


def test_top_p_keeps_the_token_that_crosses_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    masked = filter_logits(logits, torch.tensor([0]), torch.tensor([0.6]), torch.tensor([0.0]))
    assert (masked > float("-inf")).tolist() == [[True, True, False, False]]


def test_repetition_penalty_as_transformers():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, -1]]), torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]


def test_presence_and_frequency_penalties_as_openai():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0]])
    reply = torch.tensor([[3, 3, 0], [1, -1, -1]])
    out = apply_reply_penalties(logits, reply, torch.tensor([0.5, 0.0]), torch.tensor([1.0, 0.25]))
    assert out.tolist() == [[2.0 - 0.5 - 1.0, -1.0, 0.5, 3.0 - 1.0 - 1.0], [1.0, 0.75, 1.0, 1.0]]


def test_frequency_penalty_stops_greedy_repetition(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=512)
    plain = engine.generate(["a a a a"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].token_ids
    spread = engine.generate(["a a a a"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                         frequency_penalty=2.0, presence_penalty=2.0))[0].token_ids
    assert len(set(spread)) > len(set(plain))


def test_sampler_seeded_rows_are_reproducible_and_follow_the_distribution():
    sampler = Sampler(torch.device("cpu"))
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log()[None].expand(4000, -1).contiguous()
    params = [SamplingParams(temperature=1.0)] * 4000
    draws = sampler(logits, params, [5] * 4000, torch.arange(4000), torch.empty(0))  # one request, 4000 draws
    freq = torch.bincount(draws, minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)
    by_seed = sampler(logits, params, list(range(4000)), torch.zeros(4000, dtype=torch.int64), torch.empty(0))
    assert torch.allclose(torch.bincount(by_seed, minlength=3).float() / 4000, probs, atol=0.03)
    again = sampler(logits[:5], params[:5], [9] * 5, torch.arange(5), torch.empty(0))
    assert torch.equal(again, sampler(logits[:5], params[:5], [9] * 5, torch.arange(5), torch.empty(0)))


def test_noise_is_exponential_and_independent_across_tokens_seeds_and_positions():
    noise = exponential_noise(torch.tensor([1, 2, 2**40 + 1]), torch.tensor([0, 0, 0]), 20000)
    assert noise.min() > 0 and torch.isfinite(noise).all()
    assert abs(noise.mean().item() - 1.0) < 0.02 and abs(noise.var().item() - 1.0) < 0.05
    assert not torch.equal(noise[0], noise[1])
    assert torch.equal(noise[0], noise[2])  # seeds are taken modulo 2**32
    later = exponential_noise(torch.tensor([1]), torch.tensor([1]), 20000)
    assert torch.corrcoef(torch.stack([noise[0], later[0]]))[0, 1].abs() < 0.03


def test_greedy_rows_take_the_argmax_in_a_mixed_batch():
    sampler = Sampler(torch.device("cpu"))
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 0.0, 0.0]])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1)]
    assert sampler(logits, params, [0, 0], torch.tensor([3, 3]), torch.empty(0)).tolist() == [1, 0]


def test_stop_string_spanning_two_tokens(tiny_dir):
    engine = Engine(tiny_dir, kv_cache_tokens=512)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    out = engine.generate(["Tell me a story"], greedy)[0]
    pieces = [engine.tokenizer.decode([t]) for t in out.token_ids]
    # choose a stop string made of the end of one token's text and the start of the next one's
    i = next(i for i in range(3, len(pieces) - 1)
             if len(pieces[i]) >= 2 and pieces[i + 1] and "\ufffd" not in pieces[i] + pieces[i + 1])
    stop = pieces[i][-1:] + pieces[i + 1][:1]
    full = engine.tokenizer.decode(out.token_ids)
    stopped = engine.generate(["Tell me a story"], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[: full.index(stop)]
    assert stop not in stopped.text
    streamed = "".join(c.text for c in engine.stream("Tell me a story", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])))
    assert streamed == stopped.text
    assert engine.pages.all_free


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens must be a positive integer, got 0"),
    ({"max_tokens": -3}, "max_tokens must be a positive integer, got -3"),
    ({"temperature": -0.1}, "temperature must be in [0, 100], got -0.1"),
    ({"temperature": 1e300}, "temperature must be in [0, 100], got 1e+300"),
    ({"temperature": True}, "temperature must be in [0, 100], got True"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"top_k": -1}, "top_k must be an integer >= 0 (0 = off) that fits in 64 bits, got -1"),
    ({"top_k": 2**63}, "top_k must be an integer >= 0 (0 = off) that fits in 64 bits, got 9223372036854775808"),
    ({"top_k": 10**30}, "top_k must be an integer >= 0 (0 = off) that fits in 64 bits, got 10000000000"),
    ({"top_k": True}, "top_k must be an integer >= 0 (0 = off) that fits in 64 bits, got True"),
    ({"top_k": 5.0}, "top_k must be an integer >= 0 (0 = off) that fits in 64 bits, got 5.0"),
    ({"max_tokens": True}, "max_tokens must be a positive integer, got True"),
    ({"max_tokens": 2**64}, "max_tokens must be a positive integer, got 18446744073709551616"),
    ({"seed": True}, "seed must be an integer that fits in 64 bits, got True"),
    ({"seed": 2**64}, "seed must be an integer that fits in 64 bits, got 18446744073709551616"),
    ({"min_p": 2.0}, "min_p must be in [0, 1], got 2.0"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be in [0.01, 100], got 0.0"),
    ({"repetition_penalty": 1e-40}, "repetition_penalty must be in [0.01, 100], got 1e-40"),
    ({"repetition_penalty": 1e300}, "repetition_penalty must be in [0.01, 100], got 1e+300"),
    ({"min_p": float("nan")}, "min_p must be in [0, 1], got nan"),
    ({"stop": [""]}, "stop strings must be non-empty strings"),
    ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
    ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3"),
])
def test_bad_sampling_params(kwargs, message):
    from lemma import LemmaError

    with pytest.raises(LemmaError) as info:
        SamplingParams(**kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_sampling_at_the_limits_runs_in_one_batch(tiny_dir):
    """Values at the edge of each range sample side by side: a top_k past the vocabulary keeps every
    token, a temperature below GREEDY_BELOW is greedy, extreme penalties stay finite in float32."""
    from lemma.engine.sampler import GREEDY_BELOW, INT64_MAX

    engine = Engine(tiny_dir, kv_cache_tokens=512, max_batch=4)
    edge = [SamplingParams(max_tokens=4, top_k=INT64_MAX, seed=2**64 - 1, ignore_eos=True),
            SamplingParams(max_tokens=4, temperature=GREEDY_BELOW / 10, ignore_eos=True),
            SamplingParams(max_tokens=4, temperature=100, repetition_penalty=100, seed=-(2**63), ignore_eos=True),
            SamplingParams(max_tokens=4, repetition_penalty=0.01, presence_penalty=-2, frequency_penalty=2, ignore_eos=True)]
    outs = engine.generate(["Tell me a story"] * 4, edge)
    assert [o.finish_reason for o in outs] == ["length"] * 4, [o.error for o in outs]
    greedy = engine.generate(["Tell me a story"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert outs[1].token_ids == greedy.token_ids and engine.pages.all_free
