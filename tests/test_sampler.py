"""The client's CPU sampler against HF's logits processors, which define the semantics."""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from client.sampler import Sampler, SamplingParams

V = 200


def _logits(seed, v=V):
    return (torch.randn(v, generator=torch.Generator().manual_seed(seed)) * 3).numpy()  # [V] float32


def _hf_scores(logits, temperature, top_k, top_p, prev=(), penalty=1.0):
    """HF's processing order: repetition penalty, then temperature, top-k, top-p warpers."""
    scores = torch.tensor(logits)[None, :]  # [1, V]
    ids = torch.tensor([list(prev)], dtype=torch.long)  # [1, n]
    if penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scores[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.9), (0.5, 50, 0.8), (1.0, 1, 1.0), (2.0, 0, 0.05), (1.0, 200, 0.999)],
)
def test_support_and_distribution_match_hf(seed, temperature, top_k, top_p):
    logits = _logits(seed)
    s = Sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=0))
    ours = s.process(logits)
    ref = _hf_scores(logits, temperature, top_k, top_p)
    # Exactly the same tokens survive, with the same probabilities.
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    torch.testing.assert_close(s.probs(logits), ref.softmax(-1))


def test_top_k_keeps_ties_like_hf():
    logits = np.array([5.0, 3.0, 3.0, 3.0, 1.0, 0.0], np.float32)
    s = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    support = torch.isfinite(s.process(logits)).nonzero().flatten().tolist()
    assert support == [0, 1, 2, 3]  # everything >= the 2nd largest value
    assert torch.equal(torch.isfinite(_hf_scores(logits, 1.0, 2, 1.0)), torch.isfinite(s.process(logits)))


def test_top_p_boundary():
    # probs 0.5, 0.25, 0.125, 0.125: top_p=0.75 keeps exactly the two most likely (HF keeps the token
    # that crosses the threshold only when the cumulative mass below it is > 1 - top_p).
    logits = np.log(np.array([0.5, 0.25, 0.125, 0.125], np.float32))
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=0))
    support = set(torch.isfinite(s.process(logits)).nonzero().flatten().tolist())
    ref = set(torch.isfinite(_hf_scores(logits, 1.0, 0, 0.75)).nonzero().flatten().tolist())
    assert support == ref and {0, 1} <= support and 3 not in support


def test_tiny_top_p_keeps_the_argmax():
    logits = _logits(5)
    s = Sampler(SamplingParams(temperature=1.0, top_p=1e-6, seed=0))
    assert torch.isfinite(s.process(logits)).nonzero().flatten().tolist() == [int(np.argmax(logits))]
    assert all(s.sample(logits) == int(np.argmax(logits)) for _ in range(20))


def test_samples_stay_in_support():
    logits = _logits(7)
    s = Sampler(SamplingParams(temperature=1.5, top_k=5, seed=3))
    top5 = set(np.argsort(logits)[-5:].tolist())
    draws = [s.sample(logits) for _ in range(300)]
    assert set(draws) <= top5 and len(set(draws)) > 1  # restricted, yet really sampling


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_hf(penalty):
    logits = _logits(11)
    prev = [3, 17, 3, 150, int(np.argmax(logits)), int(np.argmin(logits))]  # repeats, +/- logits
    s = Sampler(SamplingParams(temperature=1.0, repetition_penalty=penalty, seed=0))
    ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prev]), torch.tensor(logits)[None, :])[0]
    assert torch.equal(s.process(logits, prev), ref)
    # Positive logits shrink and negative ones grow in magnitude when penalized.
    if penalty > 1:
        out = s.process(logits, prev)
        for t in set(prev):
            assert (out[t] < logits[t]) if logits[t] > 0 else (out[t] <= logits[t])


def test_repetition_penalty_with_warpers_matches_hf():
    logits, prev = _logits(12), [1, 2, 3, 4, 5, 1]
    s = Sampler(SamplingParams(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=0))
    ref = _hf_scores(logits, 0.8, 20, 0.9, prev=prev, penalty=1.2)
    assert torch.equal(torch.isfinite(s.process(logits, prev)), torch.isfinite(ref))
    torch.testing.assert_close(s.probs(logits, prev), ref.softmax(-1))


def test_greedy_is_argmax_and_penalty_can_change_it():
    logits = np.array([1.0, 4.0, 3.9, -2.0], np.float32)
    greedy = Sampler(SamplingParams())  # temperature 0
    assert greedy.sample(logits) == 1
    assert torch.equal(greedy.probs(logits), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    penalized = Sampler(SamplingParams(repetition_penalty=1.5))
    assert penalized.sample(logits, prev_tokens=[1]) == 2  # 4.0 / 1.5 < 3.9


def test_seeded_determinism():
    logits = _logits(21)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    s1, s2 = Sampler(params), Sampler(params)
    seq1 = [s1.sample(logits) for _ in range(50)]
    seq2 = [s2.sample(logits) for _ in range(50)]
    assert seq1 == seq2 and len(set(seq1)) > 1
    s3 = Sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=4321))
    assert [s3.sample(logits) for _ in range(50)] != seq1
    # The generator is per instance: sampling elsewhere does not disturb it.
    torch.manual_seed(0)
    torch.rand(100)
    s4 = Sampler(params)
    assert [s4.sample(logits) for _ in range(50)] == seq1


def test_numpy_and_torch_inputs_agree():
    logits = _logits(31)
    p = SamplingParams(temperature=0.9, top_k=30, seed=5)
    assert torch.equal(Sampler(p).process(logits), Sampler(p).process(torch.tensor(logits)))
    assert Sampler(p).sample(logits) == Sampler(p).sample(torch.tensor(logits, dtype=torch.bfloat16).float())
    with pytest.raises(ValueError, match="1-D"):
        Sampler(p).process(logits[None, :])


def test_params_validation_and_server_form():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0.0)
    with pytest.raises(ValueError, match="unknown sampling keys"):
        SamplingParams.from_dict({"temp": 1.0})
    assert SamplingParams.from_dict({"greedy": True, "temperature": 0.8}).greedy
    assert SamplingParams().server_sampling() == {"greedy": True}
    sp = SamplingParams(temperature=0.8, top_k=4, top_p=0.9, seed=9)
    assert sp.server_sampling() == {"greedy": False, "temperature": 0.8, "top_k": 4, "top_p": 0.9, "seed": 9}
    assert SamplingParams(temperature=0.8).server_sampling()["seed"] >= 0  # a drawn seed
    assert SamplingParams(repetition_penalty=1.1).needs_client
    with pytest.raises(ValueError, match="client-side"):
        SamplingParams(repetition_penalty=1.1).server_sampling()
