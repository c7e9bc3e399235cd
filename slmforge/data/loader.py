"""Read a prepared dataset: memory-mapped token files, stateless training batches, a fixed val set.

Training batches hold no state: row g of (step, micro) is a pure function of (seed, step, micro, g).
Its source is drawn by the mixture weights and its window start uniformly, so resuming at step k needs
only k, and N processes with batch B see exactly the rows one process with batch N*B would.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from slmforge.data.batch import Batch
from slmforge.data.prepare import FORMAT_VERSION


class TokenDataset:
    """A folder written by `prepare_dataset`; `train[name]` and `val[name]` are read-only token arrays."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a prepared dataset (no meta.json); make one with `slmforge data prepare`"
            )
        try:
            meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_file} is not valid JSON: {e}") from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_file}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
        try:
            self.dtype = np.dtype(meta["dtype"])
            self.vocab_size = int(meta["vocab_size"])
            self.eos_id = int(meta["eos_id"])
            self.weights = {name: float(m["weight"]) for name, m in meta["sources"].items()}
            self.train = {name: self._open(name, "train", m["train_tokens"]) for name, m in meta["sources"].items()}
            self.val = {name: self._open(name, "val", m["val_tokens"]) for name, m in meta["sources"].items()}
        except (KeyError, TypeError) as e:
            raise ValueError(f"{meta_file} is missing or has a bad entry: {e!r}") from e
        self.meta = meta
        # chat and preference data (slmforge.data.chat, .preference): per split and source, the loss mask of
        # every token and where each conversation starts
        self.kind = meta.get("kind", "text")
        self.masks: dict[str, dict[str, np.ndarray]] = {}
        self.offsets: dict[str, dict[str, np.ndarray]] = {}
        if self.kind in ("chat", "preference"):
            for split, arrays in (("train", self.train), ("val", self.val)):
                self.masks[split] = {n: self._open(n, split, len(a), "mask", np.dtype(np.uint8)) for n, a in arrays.items()}
                self.offsets[split] = {n: self._offsets(n, split, len(a)) for n, a in arrays.items()}
            self.pad_id = int(meta.get("pad_id", self.eos_id))

    def _open(self, name: str, split: str, tokens: int, suffix: str = "bin", dtype: np.dtype | None = None) -> np.ndarray:
        file, dtype = self.path / name / f"{split}.{suffix}", dtype or self.dtype
        if not file.is_file():
            raise FileNotFoundError(f"dataset {self.path} is missing {file}")
        size = file.stat().st_size
        if size != tokens * dtype.itemsize:
            raise ValueError(
                f"{file} holds {size} bytes but meta.json says {tokens} {dtype.name} tokens; "
                "prepare the dataset again"
            )
        if tokens == 0:
            return np.zeros(0, dtype=dtype)  # an empty file cannot be memory-mapped
        return np.memmap(file, dtype=dtype, mode="r")

    def _offsets(self, name: str, split: str, tokens: int) -> np.ndarray:
        file = self.path / name / f"{split}.offsets"
        if not file.is_file():
            raise FileNotFoundError(f"dataset {self.path} is missing {file}")
        offsets = np.fromfile(file, dtype=np.int64)
        if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != tokens or np.any(np.diff(offsets) <= 0):
            raise ValueError(f"{file} does not split the {tokens} tokens of {split}.bin into conversations; "
                             "prepare the dataset again")
        return offsets

    @property
    def sources(self) -> list[str]:
        return list(self.weights)

    def __repr__(self) -> str:
        counts = ", ".join(f"{n}: {len(self.train[n]):,}+{len(self.val[n]):,}" for n in self.sources)
        return f"TokenDataset({str(self.path)!r}, train+val tokens {{{counts}}})"


def mixture_weights(dataset: TokenDataset, weights: dict[str, float] | None) -> dict[str, float]:
    """The dataset's weights, with `weights` replacing those it names (the others keep theirs)."""
    mix = dict(dataset.weights)
    if weights:
        unknown = sorted(set(weights) - set(mix))
        if unknown:
            raise ValueError(f"weights name unknown sources {unknown}; {dataset.path} has {sorted(mix)}")
        mix.update({name: float(w) for name, w in weights.items()})
    bad = {name: w for name, w in mix.items() if not (math.isfinite(w) and w >= 0)}
    if bad:
        raise ValueError(f"mixture weights must be finite and >= 0, got {bad}")
    if not any(mix.values()):
        raise ValueError(f"all mixture weights are 0 for {dataset.path}: {mix}")
    return mix


class TrainBatches:
    """Deterministic training batches: `get(step, micro)` returns this rank's (x, y) int64 [batch_size, seq_len]."""

    def __init__(
        self,
        dataset: TokenDataset,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        weights: dict[str, float] | None = None,
    ):
        if seq_len <= 0 or batch_size <= 0:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.sources, self.arrays, probs = [], [], []
        for name, weight in mixture_weights(dataset, weights).items():
            if weight == 0:
                continue
            n = len(dataset.train[name])
            if n < seq_len + 1:
                warnings.warn(
                    f"source {name!r} has {n} train tokens, fewer than seq_len+1={seq_len + 1}; left out", stacklevel=2
                )
                continue
            self.sources.append(name)
            self.arrays.append(dataset.train[name])
            probs.append(weight)
        if not self.sources:
            raise ValueError(
                f"no source of {dataset.path} with a non-zero weight has seq_len+1={seq_len + 1} train tokens; "
                f"lower seq_len or add data"
            )
        self.probs = np.array(probs) / sum(probs)
        self._cdf = np.cumsum(self.probs)
        self._cdf[-1] = 1.0  # no rounding gap above the last source
        self._n_starts = np.array([len(a) - seq_len for a in self.arrays])  # starts 0..len-seq_len-1

    def describe(self) -> str:
        """One line on what the rows hold, for the run's log."""
        mix = ", ".join(f"{name} {p:.0%}" for name, p in zip(self.sources, self.probs))
        return f"windows of {self.seq_len + 1} tokens drawn from {mix}"

    def windows(self, step: int, micro: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(source index into `sources`, window start) of each of this rank's rows."""
        if step < 0 or micro < 0:
            raise ValueError(f"step and micro must be >= 0, got {step} and {micro}")
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, step, micro])))
        # Global row g takes draws 2g and 2g+1 of the (seed, step, micro) stream, whatever the rank count.
        first = self.rank * self.batch_size
        u = rng.random((first + self.batch_size, 2))[first:]
        source = np.searchsorted(self._cdf, u[:, 0], side="right")
        start = (u[:, 1] * self._n_starts[source]).astype(np.int64)
        return source, start

    def get(self, step: int, micro: int = 0) -> Batch:
        """Tokens and their targets (shifted left by one), int64 [batch_size, seq_len]."""
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for i, (s, start) in enumerate(zip(*self.windows(step, micro))):
            rows[i] = self.arrays[s][start : start + self.seq_len + 1]
        rows = torch.from_numpy(rows)
        return Batch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())


def val_batches(
    dataset: TokenDataset,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    weights: dict[str, float] | None = None,
) -> list[Batch]:
    """A fixed validation set: up to `max_batches` batches from the val splits, the same every call.

    Windows of seq_len+1 tokens with stride seq_len (no target is scored twice). The sources share the
    rows in proportion to their mixture weights (a source out of windows leaves its share to the others),
    and each source's windows are spread evenly over its whole val split. The last batch may be short.
    """
    if seq_len <= 0 or batch_size <= 0 or max_batches <= 0:
        raise ValueError(
            f"seq_len, batch_size and max_batches must be positive: {seq_len}, {batch_size}, {max_batches}"
        )
    capacity, val_weights = {}, {}
    for name, weight in mixture_weights(dataset, weights).items():
        if weight == 0:
            continue
        n = (len(dataset.val[name]) - 1) // seq_len  # -1 for an empty split
        if n <= 0:
            warnings.warn(f"source {name!r} has {len(dataset.val[name])} val tokens: no window; left out", stacklevel=2)
            continue
        capacity[name], val_weights[name] = n, weight
    if not capacity:
        sizes = {name: len(v) for name, v in dataset.val.items()}
        raise ValueError(
            f"the val split of {dataset.path} (tokens per source: {sizes}) is too small for one window of "
            f"seq_len+1={seq_len + 1} tokens; lower seq_len or prepare the data with a larger val_fraction"
        )
    picks = _weighted_round_robin(max_batches * batch_size, val_weights, capacity)
    counts, used = Counter(picks), Counter()
    rows = np.empty((len(picks), seq_len + 1), dtype=np.int64)
    for i, name in enumerate(picks):
        start = (used[name] * capacity[name] // counts[name]) * seq_len
        used[name] += 1
        rows[i] = dataset.val[name][start : start + seq_len + 1]
    rows = torch.from_numpy(rows)
    return [
        Batch(rows[i : i + batch_size, :-1].contiguous(), rows[i : i + batch_size, 1:].contiguous())
        for i in range(0, len(rows), batch_size)
    ]


def _weighted_round_robin(total: int, weights: dict[str, float], capacity: dict[str, int]) -> list[str]:
    """`total` source names, interleaved smoothly in proportion to `weights`, each at most `capacity` times."""
    picks, credit, taken = [], dict.fromkeys(weights, 0.0), Counter()
    active = list(weights)
    while len(picks) < total and active:
        for name in active:
            credit[name] += weights[name]
        best = max(active, key=credit.__getitem__)
        credit[best] -= sum(weights[name] for name in active)
        picks.append(best)
        taken[best] += 1
        if taken[best] == capacity[best]:
            active.remove(best)
    return picks


def training_batches(dataset: TokenDataset, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                     world_size: int = 1, weights: dict[str, float] | None = None, grad_accum: int = 1,
                     pack: bool = True):
    """The training batches of `dataset`: windows of text, whole conversations of chat data (packed with
    `pack`, else padded), or pairs of preference data (always padded); each has `get(step, micro) -> Batch`."""
    if dataset.kind == "preference":
        from slmforge.data.preference_batches import PairBatches

        return PairBatches(dataset, seq_len, batch_size, seed, rank, world_size, weights, grad_accum)
    if dataset.kind == "chat":
        from slmforge.data.conversation_batches import ConversationBatches

        return ConversationBatches(dataset, seq_len, batch_size, seed, rank, world_size, weights, grad_accum, pack)
    return TrainBatches(dataset, seq_len, batch_size, seed, rank, world_size, weights)


def validation_batches(dataset: TokenDataset, seq_len: int, batch_size: int, max_batches: int,
                       weights: dict[str, float] | None = None, pack: bool = True) -> list[Batch]:
    """The fixed validation set of `dataset` (see `val_batches`; chat data: `conversation_val_batches`;
    preference data: `preference_val_batches`, paired batches of the val pairs)."""
    if dataset.kind == "preference":
        from slmforge.data.preference_batches import preference_val_batches

        return preference_val_batches(dataset, seq_len, batch_size, max_batches, weights)
    if dataset.kind == "chat":
        from slmforge.data.conversation_batches import conversation_val_batches

        return conversation_val_batches(dataset, seq_len, batch_size, max_batches, weights, pack)
    return val_batches(dataset, seq_len, batch_size, max_batches, weights)
