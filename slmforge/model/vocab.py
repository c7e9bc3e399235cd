"""New token ids for a trained model: rows added to every vocabulary-indexed weight (embedding, head)."""

from __future__ import annotations

import torch


def grow_vocab_rows(tensors: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                    old_vocab: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`tensors` of a model with `old_vocab` ids, each weight whose first dimension is the vocabulary
    extended to the shape it has in `target` (a larger model's state dict). A new row is the mean of the
    old rows: a new token's embedding starts where an average token's is, and its logit starts near the
    average logit instead of at a random value that could dominate the softmax. Returns (tensors, the names
    grown)."""
    out, grown = dict(tensors), []
    for name, t in tensors.items():
        want = target.get(name)
        if (want is not None and t.dim() >= 1 and t.shape[0] == old_vocab and want.shape[0] > old_vocab
                and want.shape[1:] == t.shape[1:]):
            mean = t.float().mean(0, keepdim=True).to(t.dtype)
            out[name] = torch.cat((t, mean.expand(want.shape[0] - old_vocab, *t.shape[1:])))
            grown.append(name)
    return out, grown
