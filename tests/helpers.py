"""Small builders shared by the training tests."""

from pathlib import Path

from slmforge.data.prepare import prepare_dataset
from slmforge.data.sources import Source
from slmforge.tokenizer import byte_tokenizer

WORDS = "the a quick brown fox dog jumps over lazy river stone light green small tall tree".split()


def make_dataset(folder: Path, texts: list[str], val_fraction: float = 0.25) -> Path:
    """A prepared byte-tokenizer dataset with one document per text."""
    src = folder / "src"
    src.mkdir(parents=True)
    for i, text in enumerate(texts):
        (src / f"doc{i:03d}.txt").write_text(text)
    prepare_dataset([Source("text", str(src))], byte_tokenizer(), folder / "data", val_fraction, progress=False)
    return folder / "data"


def sentences(n_docs: int = 24, words: int = 120) -> list[str]:
    return [" ".join(WORDS[(7 * d + 3 * i + i * i) % len(WORDS)] for i in range(words)) + "." for d in range(n_docs)]
