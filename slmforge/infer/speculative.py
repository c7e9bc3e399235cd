"""Self-speculative greedy decoding with the model's first MTP module as the drafter (DeepSeek-V3).

Each step the MTP module, fed the decoder's last hidden state and the token just chosen, drafts the token
after it; the decoder then runs on [chosen, draft] in one forward. If its own greedy choice after
`chosen` equals the draft, both are kept and the second position's choice comes free: two tokens for one
decoder forward. Otherwise the draft is rolled back out of the cache and the decoder's choice is kept.
Either way every kept token is the decoder's own argmax, so the output equals plain greedy decoding.

The MTP module keeps a cache of its own: its entry i holds (decoder hidden state at i, token i + 1), so
after a step it takes the one or two new pairs before drafting again.
"""

import time
from dataclasses import dataclass

import torch


@dataclass
class SpeculativeResult:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS) or "length"
    drafted: int  # draft tokens proposed: one per decoder forward after the prompt
    accepted: int  # draft tokens the decoder agreed with
    seconds: float

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.inference_mode()
def speculative_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None,
                       min_new_tokens: int = 0) -> SpeculativeResult:
    """Greedy continuation of one prompt, drafting with MTP; the same tokens as plain greedy decoding."""
    if not model.mtp:
        raise ValueError("speculative decoding needs a model with an MTP module (model.mtp_depth >= 1)")
    if not prompt_ids:
        raise ValueError("the prompt is empty: a model needs at least one token to continue")
    max_len = len(prompt_ids) + max_new_tokens + 1  # + the last draft, verified past the end
    if max_len > model.cfg.max_seq_len:
        raise ValueError(f"the prompt plus max_new_tokens={max_new_tokens} exceeds max_seq_len={model.cfg.max_seq_len}")
    device = model.embed.weight.device
    out: list[int] = []

    def choose(logits: torch.Tensor) -> int:
        if eos_id is not None and len(out) < min_new_tokens:
            logits = logits.clone()
            logits[..., eos_id] = -torch.inf
        return int(logits.argmax(dim=-1))

    start = time.perf_counter()
    cache, mtp_cache = model.new_cache(1, max_len), model.new_cache(1, max_len, mtp=True)
    prompt = torch.tensor([prompt_ids], device=device)
    logits, aux = model(prompt, cache=cache, last_only=True, return_hidden=True)
    token = choose(logits[0, -1])
    out.append(token)
    # the MTP module's pending pairs: decoder hidden states at i and the tokens at i + 1
    hidden, following = aux["hidden"], torch.cat((prompt[:, 1:], prompt.new_tensor([[token]])), dim=1)
    drafted = accepted = 0
    while len(out) < max_new_tokens and token != eos_id:
        draft_logits, _ = model.draft(hidden, following, mtp_cache)
        draft = choose(draft_logits[0, -1])
        logits, aux = model(prompt.new_tensor([[token, draft]]), cache=cache, return_hidden=True)
        drafted += 1
        verified = choose(logits[0, 0])
        if verified == draft and draft != eos_id and len(out) + 1 < max_new_tokens:
            accepted += 1
            out.append(draft)
            token = choose(logits[0, 1])
            hidden, following = aux["hidden"], prompt.new_tensor([[draft, token]])
        else:
            cache.truncate(cache.lengths - 1)  # the draft's entry
            token = verified
            hidden, following = aux["hidden"][:, :1], prompt.new_tensor([[token]])
        out.append(token)
    if eos_id in out:
        out = out[:out.index(eos_id) + 1]
    reason = "stop" if out and out[-1] == eos_id else "length"
    return SpeculativeResult(out[:max_new_tokens], reason, drafted, accepted, time.perf_counter() - start)
