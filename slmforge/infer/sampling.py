"""Choosing the next token from logits [B, V]: repetition penalty, temperature, top-k, top-p, greedy.

Each step is a pure function on a batch of logits; `sample_next` chains them in Hugging Face's order
(penalties and masks on the raw logits, then temperature, top-k, top-p), so the same settings give the
same distribution as `transformers.generate`.
"""

import math
from dataclasses import dataclass, field

import torch


MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's API allows


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    min_new_tokens: int = 0  # EOS is masked out until this many tokens have been generated
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already in the sequence, prompt included
    stop: list[str] = field(default_factory=list)  # the text is cut before the first of these
    stop_token_ids: list[int] = field(default_factory=list)  # end the sequence like EOS (a chat's end of turn)
    seed: int | None = None  # None: a fresh random seed
    logprobs: int | None = None  # the chosen token's log-probability and this many most likely alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token after the first

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must lie in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (integers >= 0), got {self.stop_token_ids!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {value!r}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: the logits of tokens already seen ([B, V] bool) are divided by `penalty` where
    positive and multiplied by it where negative, so a penalty > 1 always makes them less likely."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th included); k = 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability mass is >= p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # a token is needed while the mass before it is < p
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return torch.argmax(logits, dim=-1)


def sample_next(logits: torch.Tensor, seen: torch.Tensor | None, params: SamplingParams,
                generator: torch.Generator | None = None, suppress_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V], every row with the same settings (see `sample_rows`)."""
    rows = logits.shape[0]
    suppress = None if suppress_ids is None else [suppress_ids] * rows
    return sample_rows(logits, [params] * rows, [generator] * rows, seen, suppress)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                seen: torch.Tensor | None = None, suppress: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V], row i with its own settings `params[i]` and random generator.

    `seen` ([B, V] bool) marks the tokens already in each sequence, prompt included, for the repetition
    penalty; `suppress[i]` are token ids row i must not choose now (EOS before min_new_tokens). A row's
    choice depends on its own logits and generator only, never on the other rows.
    """
    logits = logits.float()
    penalties = [p.repetition_penalty for p in params]
    if seen is not None and any(x != 1.0 for x in penalties):
        penalty = torch.tensor(penalties, device=logits.device)[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    if suppress is not None and any(ids is not None for ids in suppress):
        logits = logits.clone()
        for row, ids in enumerate(suppress):
            if ids is not None:
                logits[row, ids] = float("-inf")
    chosen = greedy(logits)
    sampled = [row for row, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return chosen
    sub = logits[sampled] / torch.tensor([params[r].temperature for r in sampled], device=logits.device)[:, None]
    vocab = logits.shape[-1]  # top_k >= the vocabulary keeps every token
    ks = torch.tensor([min(params[r].top_k, vocab) for r in sampled], device=logits.device)
    ps = torch.tensor([params[r].top_p for r in sampled], device=logits.device)
    order = None
    if bool((ks > 0).any()) or bool((ps < 1).any()):  # filter on the sorted logits, all rows at once
        sub, order = torch.sort(sub, dim=-1, descending=True)
        rank = torch.arange(sub.shape[-1], device=sub.device)
        keep_k = (ks[:, None] <= 0) | (sub >= sub.gather(1, (ks.clamp(min=1) - 1)[:, None]))  # ties with the k-th stay
        sub = sub.masked_fill(~keep_k, float("-inf"))
        probs = torch.softmax(sub, dim=-1)
        keep_p = (torch.cumsum(probs, dim=-1) - probs < ps[:, None]) | (rank == 0)
        sub = sub.masked_fill(~keep_p, float("-inf"))
    cdf = torch.cumsum(torch.softmax(sub, dim=-1), dim=-1)
    draws = torch.cat([torch.rand(1, generator=generators[r], device=cdf.device) for r in sampled])
    # side="right": the first token whose cumulative mass exceeds the draw, so never one of mass 0
    index = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], side="right").clamp_(max=cdf.shape[-1] - 1)
    tokens = index[:, 0] if order is None else order.gather(1, index)[:, 0]
    chosen[sampled] = tokens
    return chosen


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, n: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-probabilities under the model (raw logits [B, V], before any sampling setting) of the chosen
    tokens [B], and the n most likely tokens of each row with theirs, best first."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(1, chosen[:, None])[:, 0].tolist()
    if n == 0:
        return picked, [[] for _ in picked]
    values, ids = torch.topk(logp, n, dim=-1)
    return picked, [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
