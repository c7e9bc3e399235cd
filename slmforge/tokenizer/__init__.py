"""Tokenizers as files: a byte-level BPE trained on the data, or a 258-id byte tokenizer."""

from slmforge.tokenizer.bpe import byte_tokenizer, train_bpe
from slmforge.tokenizer.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer

__all__ = ["SPECIAL_TOKENS", "Tokenizer", "byte_tokenizer", "load_tokenizer", "train_bpe"]
