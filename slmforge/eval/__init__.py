"""`slmforge eval`: validation loss, perplexity and bits per byte of a checkpoint (held-out figures in
`heldout`, shared with the trainer)."""

from __future__ import annotations

from slmforge.data.loader import TokenDataset, validation_batches
from slmforge.eval.heldout import evaluate
from slmforge.infer.load import load_model
from slmforge.model import packs_rows


def evaluate_validation(loaded, data: str | None = None, max_batches: int | None = None,
                        seq_len: int | None = None) -> tuple[dict, list, str, int]:
    """(loss/ppl/bpb figures, the batches, the dataset path, the sequence length) of a loaded model on the val
    split of `data` (default: the dataset its last phase trained on)."""
    cfg, tokenizer = loaded.config, loaded.tokenizer
    phase = cfg.run_phases()[-1]
    data = data or phase.data.path
    if not data:
        raise ValueError(f"{loaded.checkpoint} names no dataset (data.path); pass --data")
    dataset = TokenDataset(data)
    if dataset.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"{data} was tokenized with {dataset.vocab_size} tokens, the model's tokenizer has "
                         f"{tokenizer.vocab_size}: prepare it with this run's tokenizer")
    seq_len = seq_len or phase.data.seq_len
    batches = validation_batches(dataset, seq_len, phase.data.batch_size, max_batches or cfg.train.eval_batches,
                                 phase.data.weights or None, packs_rows(phase.data.packing, cfg.model))
    figures = evaluate(loaded.model, batches, tokenizer.token_byte_lengths(), loaded.autocast())
    return figures, batches, str(data), seq_len


def evaluate_checkpoint(path, data: str | None = None, max_batches: int | None = None,
                        seq_len: int | None = None, quiet: bool = False) -> dict:
    """Evaluate the checkpoint at `path` (or a run's newest intact one) on the val split of `data`
    (default: its own)."""
    loaded = load_model(path, device="cpu")
    result, batches, data, _ = evaluate_validation(loaded, data, max_batches, seq_len)
    checkpoint = loaded.checkpoint
    result.update(checkpoint=str(checkpoint), data=data, tokens=sum(b.scored for b in batches))
    if not quiet:
        print(f"{checkpoint}: {result['tokens']:,} val tokens of {data}")
        print(f"  val loss {result['loss']:.4f} nats/token | perplexity {result['ppl']:.2f} | "
              f"bits per byte {result['bpb']:.4f}")
    return result
