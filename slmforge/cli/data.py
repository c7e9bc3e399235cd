"""`slmforge tokenizer train` and `slmforge data prepare`."""

from __future__ import annotations

from slmforge.cli.args import COUNT, POSITIVE_INT, add_sources, number, sources


def cmd_tokenizer_train(args) -> None:
    from slmforge.tokenizer import byte_tokenizer, train_bpe

    if args.byte:
        tokenizer = byte_tokenizer()
    else:
        tokenizer = train_bpe(sources(args.source), args.vocab_size, max_chars=args.max_chars)
    tokenizer.save(args.out)
    print(f"tokenizer with {tokenizer.vocab_size} tokens written to {args.out}/tokenizer.json")


def cmd_data_prepare(args) -> None:
    from slmforge.data.prepare import prepare_dataset
    from slmforge.tokenizer import load_tokenizer

    if args.fim_spm_rate is not None and not args.fim_rate:
        raise ValueError("--fim-spm-rate orders the fill-in-the-middle documents: give --fim-rate too")
    tokenizer = load_tokenizer(args.tokenizer)
    from slmforge.data.sources import parse_source

    prepare_dataset(sources(args.source), tokenizer, args.out, val_fraction=args.val_fraction,
                    max_tokens_per_source=args.max_tokens_per_source,
                    val_sources=[parse_source(s) for s in args.val_source], fim_rate=args.fim_rate,
                    fim_spm_rate=0.5 if args.fim_spm_rate is None else args.fim_spm_rate, fim_seed=args.fim_seed)


def register(sub) -> None:
    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command", required=True)
    p = tok.add_parser("train", help="train a byte-level BPE (or write the byte tokenizer)")
    add_sources(p)
    p.add_argument("--vocab-size", type=POSITIVE_INT, default=8192)
    p.add_argument("--max-chars", type=POSITIVE_INT, default=50_000_000, help="cap on training text, for speed")
    p.add_argument("--byte", action="store_true", help="write the 258-token byte tokenizer instead")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="tokenize sources into train/val token shards")
    add_sources(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or a folder holding it")
    p.add_argument("--out", required=True)
    p.add_argument("--val-fraction", type=number(float, 0, 1, high_open=True), default=0.01)
    p.add_argument("--max-tokens-per-source", type=POSITIVE_INT, default=None)
    p.add_argument("--val-source", action="append", default=[], metavar="NAME=PATH",
                   help="the whole validation set of source NAME (e.g. a test split); repeatable")
    p.add_argument("--fim-rate", type=number(float, 0, 1), default=0.0,
                   help="share of the training documents rearranged for fill-in-the-middle: cut at two random "
                        "characters, the middle moved last behind <fim_prefix>/<fim_suffix>/<fim_middle> (added to "
                        "the tokenizer when missing). The validation split stays plain, so its losses compare with "
                        "data prepared without FIM (default 0: off)")
    p.add_argument("--fim-spm-rate", type=number(float, 0, 1), default=None,
                   help="share of the FIM documents in suffix-prefix-middle order, the rest prefix-suffix-middle "
                        "(default 0.5)")
    p.add_argument("--fim-seed", type=COUNT, default=0, help="seed of the per-document FIM draws (default 0)")
    p.set_defaults(func=cmd_data_prepare)
