"""Turn sources of documents into token shards on disk, streaming, so a corpus need not fit in memory.

A prepared dataset is a folder:

    meta.json                     format_version, dtype, vocab_size, eos_id, per-source counts and weights,
                                  the fill-in-the-middle settings (null when off)
    tokenizer.json, tokenizer_config.json
    <source>/train.bin, val.bin   raw token ids (uint16, or uint32 for vocabularies over 65,536)

Each document's tokens are followed by one EOS. Sources stay separate on disk with their mixture
weights recorded; the loader samples them by weight, so the mixture can change without re-tokenizing.
With `fim_rate` > 0, that share of the training documents is rearranged for fill-in-the-middle
(`slmforge.data.fim`); validation documents stay plain, so validation losses compare with runs without FIM.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from slmforge.data.fim import FimCut, FimTransform, check_rate, find_fim_ids, with_fim_tokens
from slmforge.data.sources import Source, SourceStats, check_sources, iter_documents

if TYPE_CHECKING:  # the tokenizer package imports slmforge.data; a runtime import here would be circular
    from slmforge.tokenizer import Tokenizer

FORMAT_VERSION = 1
ENCODE_BATCH = 256  # documents per call to the (parallel) batch encoder
ENCODE_CHARS = 1 << 22  # ... or fewer: a batch's token ids are Python ints (~36 bytes each) until written
_RESERVED_NAMES = {"meta.json", "tokenizer.json", "tokenizer_config.json"}
_COUNTS = ("documents", "train_tokens", "val_tokens", "bytes", "skipped_files", "skipped_lines")  # summed in "total"
_GOLDEN = 0.6180339887498949  # frac(i * golden ratio) spreads the val documents evenly over a source


def prepare_dataset(
    sources: list[Source],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    val_fraction: float = 0.01,
    max_tokens_per_source: int | None = None,
    progress: bool = True,
    val_sources: list[Source] | None = None,
    fim_rate: float = 0.0,
    fim_spm_rate: float = 0.5,
    fim_seed: int = 0,
) -> dict:
    """Tokenize `sources` into a dataset folder at `out_dir` and return its meta.json content.

    Every source must exist before any is read. The folder is written whole or not at all (`dataset_folder`).
    `max_tokens_per_source` stops reading a source after the document that reaches it. A source with a
    `val_sources` entry of the same name (e.g. GSM8K's test split) takes its whole validation set from
    there, and all its own documents train.
    `fim_rate` > 0 rearranges that share of the training documents for fill-in-the-middle, `fim_spm_rate` of
    them in SPM order, drawn per document from `fim_seed`; the saved tokenizer gains the FIM tokens it lacks.
    """
    _check_arguments(sources, val_fraction, max_tokens_per_source)
    check_rate("fim_rate", fim_rate)
    check_rate("fim_spm_rate", fim_spm_rate)
    held_out = {s.name: s for s in val_sources or []}
    unknown = sorted(set(held_out) - {s.name for s in sources})
    if unknown:
        raise ValueError(f"validation sources {unknown} name no training source (names: {[s.name for s in sources]})")
    check_sources([*sources, *held_out.values()])
    fim = None
    if fim_rate > 0:
        tokenizer = with_fim_tokens(tokenizer)
        fim = FimTransform(find_fim_ids(tokenizer), fim_rate, fim_spm_rate, fim_seed)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    with dataset_folder(Path(out_dir)) as partial:
        tokenizer.save(partial)
        per_source = {}
        for source in sources:
            per_source[source.name] = _write_source(
                source, tokenizer, partial / source.name, dtype, val_fraction, max_tokens_per_source, progress,
                held_out.get(source.name), fim,
            )
        _check_not_empty(sources, per_source)
        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "bos_id": tokenizer.bos_id,
            "val_fraction": val_fraction,
            "fim": fim and fim.settings() | {"documents": {n: m["fim_documents"] for n, m in per_source.items()}},
            "sources": per_source,
            "total": {k: sum(m[k] for m in per_source.values()) for k in _COUNTS},
        }
        (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if progress:
        print(format_report(meta))
    return meta


def _check_arguments(sources: list[Source], val_fraction: float, max_tokens: int | None) -> None:
    if not sources:
        raise ValueError("prepare_dataset needs at least one source")
    names = [s.name for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"source names must be unique; repeated: {repeated}")
    reserved = sorted(_RESERVED_NAMES.intersection(names))
    if reserved:
        raise ValueError(f"source names {reserved} clash with the dataset's own files; rename them")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens_per_source must be positive, got {max_tokens}")


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace anything but a prepared dataset: out_dir is deleted once the new one is ready."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"output {out_dir} exists and is not a folder")
    if any(out_dir.iterdir()) and not (out_dir / "meta.json").is_file():
        raise ValueError(
            f"output {out_dir} exists and is not a prepared dataset (no meta.json); refusing to replace it"
        )


def _is_val(index: int, fraction: float) -> bool:
    """Whether document `index` of a source goes to val: an evenly spread, deterministic `fraction`.

    Document 0 always trains (a one-document source keeps its text) and document 1 always validates
    (any source of two or more documents has a val document), with no need to look ahead in the stream.
    """
    if fraction == 0 or index == 0:
        return False
    return index == 1 or (index * _GOLDEN) % 1.0 < fraction


def _batches(documents: Iterable[tuple[str, str | None]]) -> Iterator[list[tuple[str, str | None]]]:
    """Lists of up to ENCODE_BATCH (document, split) pairs, cut early at ENCODE_CHARS so big files do not
    pile up."""
    batch, chars = [], 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc[0])
        if len(batch) == ENCODE_BATCH or chars >= ENCODE_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _write_source(
    source: Source,
    tokenizer: Tokenizer,
    folder: Path,
    dtype: np.dtype,
    val_fraction: float,
    max_tokens: int | None,
    progress: bool,
    val_source: Source | None = None,
    fim: FimTransform | None = None,
) -> dict:
    """Tokenize one source into folder/train.bin and folder/val.bin (with `val_source`: all of the source
    to train.bin, all of val_source to val.bin), training documents through `fim` when given; return its
    meta.json entry."""
    folder.mkdir()
    stats = SourceStats()
    documents = nbytes = fim_documents = 0  # counted as written: the reader may have read ahead of a max_tokens stop
    tokens = {"train": 0, "val": 0}
    done = False
    bar = tqdm(desc=f"{source.name:>12}", unit=" docs", disable=not progress)
    stream = ((doc, "train" if val_source else None) for doc in iter_documents(source, stats))
    if val_source is not None:
        stream = chain(stream, ((doc, "val") for doc in iter_documents(val_source, stats)))
    with open(folder / "train.bin", "wb") as train_file, open(folder / "val.bin", "wb") as val_file:
        files = {"train": train_file, "val": val_file}
        for batch in _batches(stream):
            parts = {"train": [], "val": []}
            texts = [text for text, _ in batch]
            splits = [split or ("val" if _is_val(documents + i, val_fraction) else "train")
                      for i, (_, split) in enumerate(batch)]
            cuts: list[FimCut | None] = [None] * len(batch)
            if fim is None:
                encoded = tokenizer.encode_batch(texts)
            else:  # a document is named by its source and index: its cut does not depend on the batching
                cuts = fim.cuts(texts, [f"{source.name}/{documents + i}" if split == "train" else None
                                        for i, split in enumerate(splits)])
                encoded = fim.encode_batch(tokenizer, texts, cuts)
            for text, split, cut, ids in zip(texts, splits, cuts, encoded):
                ids.append(tokenizer.eos_id)
                fim_documents += cut is not None
                parts[split].append(ids)
                tokens[split] += len(ids)
                documents += 1
                nbytes += len(text.encode("utf-8"))
                done = max_tokens is not None and tokens["train"] + tokens["val"] >= max_tokens
                if done:
                    break
            for split, file in files.items():
                # file.write, not ndarray.tofile: a short write (a full disk) then raises with its errno
                file.write(np.fromiter(chain.from_iterable(parts[split]), dtype=dtype))
            bar.update(len(parts["train"]) + len(parts["val"]))
            bar.set_postfix(tokens=f"{tokens['train'] + tokens['val']:,}")
            if done:
                break
    bar.close()
    return {
        "paths": source.paths,
        "val_paths": val_source.paths if val_source else None,
        "fields": source.fields,
        "weight": source.weight,
        "documents": documents,
        "train_tokens": tokens["train"],
        "val_tokens": tokens["val"],
        "bytes": nbytes,
        "skipped_files": stats.skipped_files,
        "skipped_lines": stats.skipped_lines,
        "skip_reasons": dict(stats.reasons),
        "skip_examples": stats.examples,
        "fim_documents": fim_documents,
    }


def _check_not_empty(sources: list[Source], per_source: dict) -> None:
    empty = [s for s in sources if per_source[s.name]["documents"] == 0]
    if not empty:
        return
    details = "; ".join(
        f"{s.name!r} ({s.paths}, fields {s.fields}): skipped {per_source[s.name]['skip_reasons'] or 'nothing'}"
        for s in empty
    )
    what = "the corpus is empty" if len(empty) == len(sources) else "some sources gave no documents"
    raise ValueError(f"{what}: {details}")


@contextlib.contextmanager
def dataset_folder(out_dir: Path) -> Iterator[Path]:
    """A folder to write a dataset into: made beside `out_dir` under a temporary name, renamed to `out_dir`
    when the block ends and removed if it fails, so a failed run leaves no half dataset and an existing
    dataset at `out_dir` is replaced only on success. A killed run leaves its temporary folder, which the
    next prepare into `out_dir` removes."""
    _check_replaceable(out_dir)
    _remove_leftovers_of_dead_runs(out_dir)
    partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        yield partial
        _move_into_place(partial, out_dir)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        if e.errno is None:  # a message of our own (a source that vanished): it already says what and where
            raise
        # The failing path is a temporary one, gone now (or none: numpy's writes give no file name).
        raise OSError(e.errno, f"cannot write the dataset: {e.strerror}", str(out_dir)) from e
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _move_into_place(partial: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        partial.rename(out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    out_dir.rename(old)
    try:
        partial.rename(out_dir)
    except BaseException:
        old.rename(out_dir)  # the previous dataset stays in place when the new one cannot be moved there
        raise
    shutil.rmtree(old)


def _remove_leftovers_of_dead_runs(out_dir: Path) -> None:
    """Delete the .partial-PID and .old-PID folders of `out_dir` left by runs that were killed; a live
    process's are kept, so two prepares into the same output never delete each other's work."""
    if not out_dir.parent.is_dir():
        return
    leftover = re.compile(rf"\.{re.escape(out_dir.name)}\.(?:partial|old)-(\d+)")
    for path in out_dir.parent.iterdir():
        match = leftover.fullmatch(path.name)
        if match and _process_is_gone(int(match[1])):
            shutil.rmtree(path, ignore_errors=True)


def _process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 sends nothing: it only asks whether the process exists
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # another user's live process; or a number that is no pid
        pass
    return False


def format_report(meta: dict) -> str:
    """A table of tokens per source: share of all tokens, mixture weight, bytes per token and skips."""
    total_weight = sum(m["weight"] for m in meta["sources"].values()) or 1.0
    total_tokens = meta["total"]["train_tokens"] + meta["total"]["val_tokens"]
    header = (
        f"{'source':<16}{'documents':>11}{'train tok':>14}{'val tok':>12}{'share':>8}{'weight':>8}{'B/tok':>7}  skipped"
    )
    rows = [header, "-" * len(header)]
    for name, m in [*meta["sources"].items(), ("total", meta["total"] | {"weight": total_weight})]:
        tokens = m["train_tokens"] + m["val_tokens"]
        rows.append(
            f"{name:<16}{m['documents']:>11,}{m['train_tokens']:>14,}{m['val_tokens']:>12,}"
            f"{tokens / total_tokens:>8.1%}{m['weight'] / total_weight:>8.1%}{m['bytes'] / max(tokens, 1):>7.2f}"
            f"  {m['skipped_files']:,} files, {m['skipped_lines']:,} lines"
        )
    fim = meta.get("fim")  # absent from datasets prepared before FIM existed
    if fim:
        rows.append(f"fill-in-the-middle: {sum(fim['documents'].values()):,} training documents rearranged (rate "
                    f"{fim['rate']:g}, in SPM order at {fim['spm_rate']:g}, seed {fim['seed']}); validation plain")
    return "\n".join(rows)
