"""The Tokenizer every other module sees: a thin wrapper over a Hugging Face `tokenizers.Tokenizer`.

A tokenizer is a file: `tokenizer.json` (HF tokenizers format) plus `tokenizer_config.json`, so that
`transformers.AutoTokenizer.from_pretrained(folder)` loads the same ids with the same bos/eos/pad tokens.
Both the trained BPE and the byte tokenizer are byte-level: every token stands for a whole number of
bytes, which is what `token_byte_lengths` (bits-per-byte) relies on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import AddedToken, pre_tokenizers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_MARKERS = ["<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Ids 0..7 of every trained BPE, in this order; the chat markers are reserved now so that chat
# fine-tuning later needs no new embedding rows.
SPECIAL_TOKENS = [BOS, EOS, PAD, *CHAT_MARKERS]

_BYTE_CHARS = frozenset(pre_tokenizers.ByteLevel.alphabet())  # GPT-2's printable stand-ins for bytes


class Tokenizer:
    """Encode/decode text; wraps `hf`, a `tokenizers.Tokenizer` whose special tokens include the bos and eos
    tokens named (ours by default: `<|bos|>`, `<|eos|>`; an imported model's from its tokenizer_config.json)."""

    def __init__(self, hf: tokenizers.Tokenizer, bos: str = BOS, eos: str = EOS, pad: str | None = PAD,
                 chat_template: str | None = None):
        self.hf = hf
        self.chat_template = chat_template  # Jinja, as transformers reads it from tokenizer_config.json
        # Text is data: a literal "<|eos|>" inside a document is encoded as its characters, so any text
        # round-trips and special ids appear only where asked for (bos/eos, chat code). This flag is not
        # saved in tokenizer.json: transformers maps such literals to the special ids (as chat templates want).
        hf.encode_special_tokens = True
        self.special_tokens = {t.content: i for i, t in sorted(hf.get_added_tokens_decoder().items()) if t.special}
        for name in (bos, eos):
            if name not in self.special_tokens:
                raise ValueError(f"tokenizer has no special token {name}; specials: {list(self.special_tokens)}")
        self.bos_id = self.special_tokens[bos]
        self.eos_id = self.special_tokens[eos]
        self.pad_id = self.special_tokens.get(pad, self.eos_id)  # the byte tokenizer pads with eos

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally framed by bos/eos."""
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts at once (the Rust encoder runs them in parallel)."""
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets, which we never use.
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of `ids` (a list, array or tensor); special tokens are dropped unless `skip_special` is False."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.hf.decode(ids, skip_special_tokens=skip_special)

    def token_byte_lengths(self) -> np.ndarray:
        """int32 [vocab_size]: UTF-8 bytes each token id stands for (0 for special tokens), for bits-per-byte."""
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        specials = set(self.special_tokens.values())
        for i in range(self.vocab_size):
            if i in specials:
                continue
            token = self.hf.id_to_token(i)
            # Byte-level tokens spell one byte per character; anything else would make bpb wrong.
            if token is None or not _BYTE_CHARS.issuperset(token):
                raise ValueError(f"token id {i} ({token!r}) is not a byte-level token; bits-per-byte needs one")
            lengths[i] = len(token)
        return lengths

    def save(self, directory: str | Path) -> None:
        """Write `directory/tokenizer.json` and a `tokenizer_config.json` that transformers understands.

        A failed write (a full disk) leaves no half-written file and the folder's previous files as they were.
        """
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"tokenizer output {directory} is a file; give a folder to write tokenizer.json into")
        directory.mkdir(parents=True, exist_ok=True)
        named = {self.bos_id, self.eos_id, self.pad_id}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.hf.id_to_token(self.bos_id),
            "eos_token": self.hf.id_to_token(self.eos_id),
            "pad_token": self.hf.id_to_token(self.pad_id),
            "additional_special_tokens": [t for t, i in self.special_tokens.items() if i not in named],
            # Our encode() adds nothing and decode() changes no spaces; transformers must do the same.
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        # to_str rather than hf.save: the Rust writer's errors are bare Exceptions without the file name.
        _write_files(directory, {
            "tokenizer.json": self.hf.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        })

    def with_special_tokens(self, names: list[str], chat_template: str | None = None) -> Tokenizer:
        """A copy with the `names` it lacks added as special tokens after its last id (every existing id keeps
        its meaning, so a model trained with this tokenizer only needs new embedding rows), and
        `chat_template` when given."""
        hf = tokenizers.Tokenizer.from_str(self.hf.to_str())
        missing = [n for n in dict.fromkeys(names) if n not in self.special_tokens]
        if missing and any(hf.token_to_id(n) is not None for n in missing):
            taken = [n for n in missing if hf.token_to_id(n) is not None]
            raise ValueError(f"the tokenizer spells {taken} as ordinary tokens; they cannot become special tokens")
        hf.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in missing])
        names_of = {i: t for t, i in self.special_tokens.items()}
        pad = names_of.get(self.pad_id)
        return Tokenizer(hf, names_of[self.bos_id], names_of[self.eos_id], pad,
                         chat_template if chat_template is not None else self.chat_template)

    def extends(self, other: Tokenizer) -> bool:
        """Whether this tokenizer is `other` with tokens added after its last id (ids below keep their meaning)."""
        if self.vocab_size < other.vocab_size:
            return False
        mine, theirs = self.hf.get_vocab(with_added_tokens=True), other.hf.get_vocab(with_added_tokens=True)
        return all(mine.get(token) == i for token, i in theirs.items())

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json, or a folder holding one (a tokenizer, dataset, run or checkpoint folder)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}: expected a tokenizer.json file or a folder containing one")
    try:
        hf = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust loader raises a bare Exception for any parse error
        raise ValueError(f"{file} is not a valid tokenizer.json: {e}") from e
    try:
        return Tokenizer(hf, **_config_fields(file.parent / "tokenizer_config.json"))
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e


def _config_fields(config_file: Path) -> dict[str, str]:
    """bos/eos/pad token names and the chat template from a tokenizer_config.json beside tokenizer.json
    (transformers writes the names as strings or as {"content": ...}); none there: ours, and no template."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return {}
    names = {}
    for key in ("bos", "eos", "pad"):
        value = config.get(f"{key}_token") if isinstance(config, dict) else None
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            names[key] = value
    if "bos" not in names and "eos" in names:  # many models name only an end token: it starts text too
        names["bos"] = names["eos"]
    if isinstance(config, dict) and isinstance(config.get("chat_template"), str):
        names["chat_template"] = config["chat_template"]
    return names


def _write_files(directory: Path, texts: dict[str, str]) -> None:
    """Write each {file name: text} to a temporary file in `directory`, then rename them all into place."""
    temporaries = {name: directory / f".{name}.tmp-{os.getpid()}" for name in texts}
    try:
        for name, text in texts.items():
            try:
                temporaries[name].write_text(text, encoding="utf-8")
            except OSError as e:  # a failed write names no file (or the temporary one): name the real one
                raise OSError(e.errno, e.strerror, str(directory / name)) from e
        for name, temporary in temporaries.items():
            os.replace(temporary, directory / name)
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
