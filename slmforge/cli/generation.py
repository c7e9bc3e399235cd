"""`slmforge sample` and `slmforge serve`."""

from __future__ import annotations

from slmforge.cli.args import COUNT, POSITIVE_INT, number


def cmd_sample(args) -> None:
    from slmforge.infer import SamplingParams, generate
    from slmforge.infer.load import load_for_decoding

    pairs = _fim_pairs(args)
    loaded = load_for_decoding(args.run, device="cpu", max_batch=len(pairs or args.prompt))
    model, tokenizer = loaded.model, loaded.tokenizer
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed,
    )
    if pairs:
        _sample_middles(model, tokenizer, pairs, params, args.run, args.spm)
        return
    if args.speculative:
        _sample_speculative(model, tokenizer, args.prompt, params)
        return
    for prompt, completion in zip(args.prompt, generate(model, tokenizer, args.prompt, params)):
        print(f"--- {prompt!r} ({completion.finish_reason})")
        print(prompt + completion.text)


def _fim_pairs(args) -> list[tuple[str, str]]:
    """The (prefix, suffix) pairs to fill in, [] for --prompt; a mix or an unpaired flag is refused."""
    if args.prefix is None and args.suffix is None:
        if args.spm:
            raise ValueError("--spm orders a fill-in-the-middle prompt: give --prefix and --suffix")
        if not args.prompt:
            raise ValueError("give --prompt TEXT to continue, or --prefix TEXT --suffix TEXT to fill in the middle")
        return []
    prefixes, suffixes = args.prefix or [], args.suffix or []
    if args.prompt:
        raise ValueError("--prompt continues a text, --prefix/--suffix fill in a middle: give one or the other")
    if len(prefixes) != len(suffixes):
        raise ValueError(f"--prefix and --suffix come in pairs (the n-th --prefix with the n-th --suffix); got "
                         f"{len(prefixes)} --prefix and {len(suffixes)} --suffix")
    if args.speculative:
        raise ValueError("--speculative continues --prompt; it does not fill in the middle")
    return list(zip(prefixes, suffixes))


def _sample_middles(model, tokenizer, pairs: list[tuple[str, str]], params, run: str, spm: bool) -> None:
    """Print the middle generated between each prefix and suffix, from the prefix-suffix-middle prompt (or
    suffix-prefix-middle); a middle ends at EOS or at a FIM marker (or a file separator) the tokenizer has."""
    from dataclasses import replace

    from slmforge.data.fim import find_fim_ids, missing_fim_tokens
    from slmforge.infer import generate_ids

    fim = find_fim_ids(tokenizer)
    if fim is None:
        raise ValueError(f"{run} cannot fill in the middle: {missing_fim_tokens(tokenizer)}")
    order = fim.spm_prompt if spm else fim.psm_prompt
    prompts = [order(tokenizer.encode(prefix), tokenizer.encode(suffix)) for prefix, suffix in pairs]
    params = replace(params, stop_token_ids=[*params.stop_token_ids, *fim.ends])
    for (prefix, suffix), completion in zip(pairs, generate_ids(model, prompts, params, eos_id=tokenizer.eos_id,
                                                                 decode=tokenizer.decode)):
        print(f"--- {prefix!r} ... {suffix!r} ({completion.finish_reason})")
        print(completion.text)


def _sample_speculative(model, tokenizer, prompts: list[str], params) -> None:
    """Greedy decoding drafted by the MTP module, timed beside plain greedy decoding of the same prompt."""
    import time

    from slmforge.infer import generate_ids
    from slmforge.infer.speculative import speculative_greedy

    if params.temperature != 0 or params.repetition_penalty != 1.0 or params.stop:
        raise ValueError("--speculative decodes greedily: use it with --greedy, without --repetition-penalty "
                         "or --stop")
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        t0 = time.perf_counter()
        plain = generate_ids(model, [ids], params, eos_id=tokenizer.eos_id)[0]
        plain_s = time.perf_counter() - t0
        spec = speculative_greedy(model, ids, params.max_new_tokens, tokenizer.eos_id, params.min_new_tokens)
        print(f"--- {prompt!r} ({spec.finish_reason})")
        print(prompt + tokenizer.decode(spec.token_ids))
        same = "identical to" if spec.token_ids == plain.token_ids else "DIFFERENT from"
        print(f"speculative: {len(spec.token_ids)} tokens, {same} plain greedy; drafts accepted "
              f"{spec.accepted}/{spec.drafted} ({spec.acceptance_rate:.0%}); "
              f"{len(spec.token_ids) / spec.seconds:.1f} vs {plain.n_generated / plain_s:.1f} tokens/s plain "
              f"(x{plain_s / spec.seconds * len(spec.token_ids) / max(plain.n_generated, 1):.2f})")


def cmd_serve(args) -> None:
    import os

    from slmforge.serve import check_packages

    check_packages()
    from slmforge.serve.server import serve

    api_key = args.api_key or os.environ.get("SLMFORGE_API_KEY") or None
    serve(args.run, host=args.host, port=args.port, api_key=api_key, max_batch=args.max_batch,
          max_queue=args.max_queue, weights=args.weights, device=args.device, model_name=args.model_name)


def register(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a run or checkpoint")
    p.add_argument("run")
    p.add_argument("--prompt", action="append", default=[], help="repeatable: prompts decode together")
    p.add_argument("--prefix", action="append", help="fill in the middle: the text before it; repeatable, the n-th "
                   "--prefix paired with the n-th --suffix (pairs decode together). Prints only the middle; needs a "
                   "tokenizer with FIM tokens (data prepared with --fim-rate)")
    p.add_argument("--suffix", action="append", help="fill in the middle: the text after it (see --prefix)")
    p.add_argument("--spm", action="store_true", help="fill in the middle from the suffix-prefix-middle prompt, "
                   "for models trained with --fim-spm-rate > 0 (default: prefix-suffix-middle)")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=100)
    p.add_argument("--min-new-tokens", type=COUNT, default=0)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=number(float, 0), default=1.0)
    p.add_argument("--top-k", type=COUNT, default=0, help="0: off")
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=1.0, help="1: off")
    p.add_argument("--repetition-penalty", type=number(float, 0, low_open=True), default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string, repeatable")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=None)
    p.add_argument("--speculative", action="store_true",
                   help="greedy decoding drafted by the model's MTP module; reports acceptance and speed-up")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a run or checkpoint (needs slmforge[serve])")
    p.add_argument("run", help="run folder (its newest intact checkpoint) or checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=number(int, 0, 65535), default=8000, help="0: any free port")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on every route but /health and / "
                   "(default: the SLMFORGE_API_KEY environment variable, which the process list does not show)")
    p.add_argument("--max-batch", type=POSITIVE_INT, default=16, help="requests decoding at once (cache slots)")
    p.add_argument("--max-queue", type=POSITIVE_INT, default=256,
                   help="requests waiting for a slot; beyond it the server answers 429")
    p.add_argument("--weights", choices=["fp32", "bf16", "f16", "int8"], default="fp32",
                   help="how the weights are held while decoding")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    p.add_argument("--model-name", help="the name clients send as `model` (default: RUN as given)")
    p.set_defaults(func=cmd_serve)
