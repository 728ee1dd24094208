"""CPU sampling over one logits vector, with the same semantics as HF generate's processors:
repetition penalty -> temperature -> top-k -> top-p -> softmax -> multinomial."""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; > 1 discourages repeats (client-side only)
    seed: int | None = None  # None: a fresh random seed per Sampler

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "SamplingParams":
        d = dict(d or {})
        if d.pop("greedy", False):
            d["temperature"] = 0.0
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown sampling keys {sorted(unknown)}")
        return cls(**d)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_client(self) -> bool:
        """True when the server cannot sample this (it has no token history for the penalty)."""
        return self.repetition_penalty != 1.0

    def server_sampling(self) -> dict:
        """The `sampling` param of replay_seq (see graphserver.protocol.SAMPLING_KEYS)."""
        if self.needs_client:
            raise ValueError("repetition_penalty is client-side only")
        if self.greedy:
            return {"greedy": True}
        seed = self.seed if self.seed is not None else secrets.randbits(31)
        return {"greedy": False, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "seed": seed}

    def to_dict(self) -> dict:
        return asdict(self)


class Sampler:
    """Samples token ids from logits. Owns its RNG: the same seed gives the same tokens."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self._gen = torch.Generator(device="cpu")
        if params.seed is None:
            self._gen.seed()
        else:
            self._gen.manual_seed(params.seed)

    def process(self, logits: Any, prev_tokens: Iterable[int] = ()) -> torch.Tensor:
        """logits [V] -> processed scores [V] float32; filtered-out tokens are -inf.

        prev_tokens: every token already in the sequence, prompt included (as HF does)."""
        p = self.params
        scores = _as_scores(logits)  # [V] float32
        prev = torch.as_tensor(list(prev_tokens), dtype=torch.long)  # [n]
        if p.repetition_penalty != 1.0 and prev.numel():
            picked = torch.gather(scores, 0, prev)  # [n]
            # HF: penalize by dividing positive logits and multiplying negative ones.
            picked = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
            scores = scores.scatter(0, prev, picked)
        if p.greedy:
            return scores
        scores = scores / p.temperature
        if p.top_k > 0:
            k = min(p.top_k, scores.numel())
            kth = torch.topk(scores, k).values[-1]
            scores = scores.masked_fill(scores < kth, -float("inf"))  # ties with the k-th stay in
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)  # [V] ascending
            cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = cum <= (1.0 - p.top_p)
            drop_sorted[-1:] = False  # the most likely token always survives
            drop = drop_sorted.scatter(0, order, drop_sorted)
            scores = scores.masked_fill(drop, -float("inf"))
        return scores

    def probs(self, logits: Any, prev_tokens: Iterable[int] = ()) -> torch.Tensor:
        """The distribution sample() draws from, [V] float32 (one-hot for greedy)."""
        scores = self.process(logits, prev_tokens)
        if self.params.greedy:
            return torch.nn.functional.one_hot(scores.argmax(), scores.numel()).float()
        return scores.softmax(dim=-1)

    def sample(self, logits: Any, prev_tokens: Iterable[int] = ()) -> int:
        scores = self.process(logits, prev_tokens)
        if self.params.greedy:
            return int(scores.argmax())
        return int(torch.multinomial(scores.softmax(dim=-1), 1, generator=self._gen))


def _as_scores(logits: Any) -> torch.Tensor:
    if isinstance(logits, torch.Tensor):
        t = logits.detach().to(device="cpu", dtype=torch.float32)
    else:
        t = torch.tensor(np.asarray(logits, dtype=np.float32))  # a copy: wire arrays may be read-only
    if t.dim() != 1:
        raise ValueError(f"logits must be 1-D [vocab], got shape {list(t.shape)}")
    return t
