"""`slmforge chat`: talk to a model in the terminal through its chat template, replies streamed."""

from __future__ import annotations

import sys

from slmforge.cli.args import COUNT, POSITIVE_INT, number

HELP = "/reset starts a new conversation, /exit (or Ctrl-D) ends"


def _template(loaded, choice: str | None):
    from pathlib import Path

    from slmforge.data.chat import CHATML
    from slmforge.tokenizer.chat_template import ChatTemplate

    tokenizer = loaded.tokenizer
    source = tokenizer.chat_template
    if choice == "chatml":
        missing = [m for m in ("<|im_start|>", "<|im_end|>") if m not in tokenizer.special_tokens]
        if missing:
            raise ValueError(f"--template chatml: the tokenizer of {loaded.checkpoint} has no {' or '.join(missing)}")
        source = CHATML
    elif choice is not None:
        source = Path(choice).read_text(encoding="utf-8")
    if not source:
        raise ValueError(f"{loaded.checkpoint} has no chat template (chat_template in tokenizer_config.json): "
                         "fine-tune it on chat data (`slmforge data prepare --chat`), or pass --template FILE")
    return ChatTemplate(source, tokenizer)


def cmd_chat(args) -> None:
    from slmforge.infer import SamplingParams
    from slmforge.infer.chat import ChatSession
    from slmforge.infer.load import load_for_decoding
    from slmforge.tokenizer.chat_template import TemplateError

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    loaded = load_for_decoding(args.run, device=args.device, weights=args.weights)
    session = ChatSession(loaded.model, _template(loaded, args.template), params, system=args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {loaded.checkpoint} ({HELP})", file=sys.stderr)
    while True:
        try:
            text = input("you> " if interactive else "")
        except EOFError:
            break
        command = text.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            continue
        if not command:
            continue
        dropped = session.dropped_turns
        try:
            session.reply(text, lambda piece: print(piece, end="", flush=True))
        except (ValueError, TemplateError) as e:  # this turn cannot run; the conversation goes on
            print(f"slmforge: {e}", file=sys.stderr)
            continue
        print(flush=True)
        if session.dropped_turns > dropped:
            print(f"(the {session.dropped_turns} oldest exchanges no longer fit the context and were left out)",
                  file=sys.stderr)


def register(sub) -> None:
    p = sub.add_parser("chat", help="a conversation with a run or checkpoint in the terminal, through its chat "
                       "template (one line per turn; " + HELP + ")")
    p.add_argument("run", help="run folder (its newest intact checkpoint) or checkpoint folder")
    p.add_argument("--system", help="a system message before the conversation")
    p.add_argument("--template", metavar="chatml|FILE", help="the chat template (default: the tokenizer's own)")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=256, help="the longest reply (default 256)")
    p.add_argument("--temperature", type=number(float, 0), default=0.7, help="0: greedy (default 0.7)")
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=0.9, help="1: off (default 0.9)")
    p.add_argument("--top-k", type=COUNT, default=0, help="0: off")
    p.add_argument("--repetition-penalty", type=number(float, 0, low_open=True), default=1.0)
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=None)
    p.add_argument("--weights", choices=["fp32", "bf16", "f16", "int8"], default="fp32",
                   help="how the weights are held while decoding")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_chat)
