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


def _text_flags(args) -> tuple[tuple[str, object], ...]:
    """(flag, value) of the options only text sources take."""
    return (("--source", args.source), ("--val-source", args.val_source),
            ("--max-tokens-per-source", args.max_tokens_per_source), ("--fim-rate", args.fim_rate))


def _chat_template(args) -> str | None:
    """--chat-template as prepare_chat_dataset takes it: None, "chatml", or the Jinja text of the file."""
    from pathlib import Path

    if args.chat_template in (None, "chatml"):
        return args.chat_template
    return Path(args.chat_template).read_text(encoding="utf-8")


def _prepare_chat(args, tokenizer) -> None:
    import sys

    from slmforge.data.chat import format_chat_report, parse_chat_source, prepare_chat_dataset
    from slmforge.data.conversations import RowFormat, parse_pairs

    mixed = [flag for flag, value in _text_flags(args) if value]
    if mixed:
        raise ValueError(f"{mixed[0]} is for text sources; with --chat give chat files only (--val-chat for a "
                         "validation file)")
    fmt = RowFormat(args.chat_format, parse_pairs(args.role_map, "--role-map", "bot=assistant"),
                    parse_pairs(args.field, "--field", "output=answer"))
    meta = prepare_chat_dataset([parse_chat_source(s) for s in args.chat], tokenizer, args.out,
                                template=_chat_template(args), train_on=args.train_on, val_fraction=args.val_fraction,
                                val_sources=[parse_chat_source(s) for s in args.val_chat], fmt=fmt,
                                skip_bad=args.skip_bad_rows, progress=sys.stderr.isatty())
    print(format_chat_report(meta))


def _prepare_preference(args, tokenizer) -> None:
    import sys

    from slmforge.data.chat import parse_chat_source
    from slmforge.data.preference import format_preference_report, prepare_preference_dataset

    chat_only = (("--val-chat", args.val_chat), ("--role-map", args.role_map), ("--field", args.field),
                 ("--chat-format", args.chat_format != "auto"), ("--train-on", args.train_on != "assistant"))
    mixed = [flag for flag, value in (*_text_flags(args), *chat_only) if value]
    if mixed:
        raise ValueError(f"{mixed[0]} is not for preference rows; with --preference give {{prompt, chosen, "
                         "rejected}} files only (--val-preference for a validation file); the loss reads the final "
                         "replies")
    meta = prepare_preference_dataset([parse_chat_source(s, "--preference") for s in args.preference], tokenizer,
                                      args.out, template=_chat_template(args), val_fraction=args.val_fraction,
                                      val_sources=[parse_chat_source(s, "--preference") for s in args.val_preference],
                                      skip_bad=args.skip_bad_rows, progress=sys.stderr.isatty())
    print(format_preference_report(meta))


def _load_tokenizer(path: str):
    """A tokenizer.json, a folder holding one, or a run folder (its newest checkpoint's tokenizer)."""
    from pathlib import Path

    from slmforge.tokenizer import load_tokenizer

    folder = Path(path)
    if folder.is_dir() and not (folder / "tokenizer.json").exists():
        from slmforge.checkpoint import find_checkpoint, latest_checkpoint

        if latest_checkpoint(folder) is not None:
            folder = find_checkpoint(folder)
    return load_tokenizer(folder)


def cmd_data_prepare(args) -> None:
    from slmforge.data.prepare import prepare_dataset

    if args.fim_spm_rate is not None and not args.fim_rate:
        raise ValueError("--fim-spm-rate orders the fill-in-the-middle documents: give --fim-rate too")
    if args.chat and args.preference:
        raise ValueError("--chat and --preference write different datasets (conversations, or pairs for DPO): "
                         "give one of them")
    if args.val_preference and not args.preference:
        raise ValueError("--val-preference needs --preference FILE.jsonl")
    tokenizer = _load_tokenizer(args.tokenizer)
    if args.preference:
        _prepare_preference(args, tokenizer)
        return
    if args.chat:
        _prepare_chat(args, tokenizer)
        return
    chat_only = [flag for flag, value in (("--val-chat", args.val_chat), ("--chat-template", args.chat_template),
                                          ("--role-map", args.role_map), ("--field", args.field),
                                          ("--skip-bad-rows", args.skip_bad_rows))
                 if value]
    if chat_only:
        raise ValueError(f"{chat_only[0]} needs --chat FILE.jsonl")
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
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer.json, a folder holding it, or a run folder (to fine-tune: the model's own)")
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
    chat = p.add_argument_group("chat data (supervised fine-tuning)")
    chat.add_argument("--chat", action="append", default=[], metavar="[NAME=]FILE.jsonl[@WEIGHT]",
                      help="conversations, one JSON row per line: {\"messages\": [{\"role\", \"content\"}]}, "
                      "ShareGPT {\"conversations\": [{\"from\", \"value\"}]} or Alpaca {\"instruction\", "
                      "\"input\", \"output\"}; repeatable. Writes a chat dataset with a loss mask")
    chat.add_argument("--val-chat", action="append", default=[], metavar="NAME=FILE.jsonl",
                      help="the whole validation set of chat source NAME (default: --val-fraction of its rows)")
    chat.add_argument("--chat-template", metavar="FILE|chatml", help="a Jinja chat template file, or chatml "
                      "(default: the tokenizer's own template, else ChatML; missing ChatML markers are added "
                      "as special tokens). Saved in the dataset's tokenizer_config.json")
    chat.add_argument("--train-on", choices=["assistant", "last", "all"], default="assistant",
                      help="the tokens in the loss: every assistant turn (default), the last one, or all")
    chat.add_argument("--chat-format", choices=["auto", "messages", "sharegpt", "alpaca"], default="auto",
                      help="the rows' shape (default: recognised per row)")
    chat.add_argument("--role-map", action="append", default=[], metavar="NAME=ROLE",
                      help="read role NAME as system, user or assistant, e.g. bot=assistant; repeatable")
    chat.add_argument("--field", action="append", default=[], metavar="NAME=KEY",
                      help="the key the rows use for field NAME (messages, role, content, conversations, from, value, "
                      "instruction, input, output, system), e.g. instruction=question --field output=answer for "
                      "GSM8K; repeatable")
    chat.add_argument("--skip-bad-rows", action="store_true", help="leave out rows that are not conversations "
                      "(counted by reason) instead of stopping at the first")
    pairs = p.add_argument_group("preference data (DPO)")
    pairs.add_argument("--preference", action="append", default=[], metavar="[NAME=]FILE.jsonl[@WEIGHT]",
                       help="preference pairs, one JSON row per line: {\"prompt\", \"chosen\", \"rejected\"}, "
                       "the prompt a text (one user message) or a list of messages, each reply a text, an assistant "
                       "message or a list of messages ending in one; repeatable. Rendered with the chat template "
                       "(--chat-template) into a preference dataset whose mask holds the final replies; "
                       "--skip-bad-rows applies")
    pairs.add_argument("--val-preference", action="append", default=[], metavar="NAME=FILE.jsonl",
                       help="the whole validation set of preference source NAME (default: --val-fraction of its "
                       "pairs)")
    p.set_defaults(func=cmd_data_prepare)
