"""`slmforge export` and `slmforge import`."""

from __future__ import annotations

import sys


def cmd_export(args) -> None:
    from slmforge.export.hf import export_hf

    if args.to == "ollama":
        from slmforge.export.ollama import export_ollama

        out = export_ollama(args.run, args.out, dtype=args.dtype, force=args.force)
        print(f"{out}: model.gguf and Modelfile; import it with: ollama create {out.name} -f {out / 'Modelfile'}")
        return
    if args.to == "gguf":
        from slmforge.export.gguf_export import export_gguf

        out = export_gguf(args.run, args.out, dtype=args.dtype, force=args.force)
        print(f"{out}: a GGUF file for llama.cpp ({args.dtype})")
        return
    out, family = export_hf(args.run, args.out, force=args.force, native=args.native)
    how = "trust_remote_code=True (remote code)" if family == "slmforge" else f"its native class ({family})"
    print(f"{out}: loads with transformers' AutoModelForCausalLM.from_pretrained, {how}")


def cmd_import(args) -> None:
    source_format = args.source_format or ("gguf" if str(args.src).endswith(".gguf") else "hf")
    if source_format == "gguf":
        from slmforge.export.gguf_import import import_gguf

        out = import_gguf(args.src, args.out, force=args.force)
    elif source_format == "codemind":
        from slmforge.export.codemind import import_codemind

        out = import_codemind(args.src, args.out, config=args.codemind_config, tokenizer=args.tokenizer,
                              force=args.force, warn=lambda m: print(f"slmforge: {m}", file=sys.stderr))
    else:
        from slmforge.export.hf_import import import_hf

        out = import_hf(args.src, args.out, force=args.force)
    print(f"{out}: an slmforge checkpoint (eval, sample, export, train --init {out})")


def register(sub) -> None:
    p = sub.add_parser("export", help="write a run's model in another format: a Hugging Face folder, a GGUF file")
    p.add_argument("run", help="run folder (its newest intact checkpoint) or checkpoint folder "
                   "(`slmforge info RUN --targets` says which targets it can reach)")
    p.add_argument("out", help="the folder (hf, ollama) or file (gguf) to write")
    p.add_argument("--to", choices=["hf", "gguf", "ollama"], required=True,
                   help="hf: a folder transformers loads; gguf: a file llama.cpp runs; ollama: a GGUF and a Modelfile")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"], default="f32",
                   help="with --to gguf or ollama: the type of the weight matrices")
    p.add_argument("--force", action="store_true", help="replace an existing output (once the new one is complete)")
    p.add_argument("--native", action="store_true", help="demand a native transformers class; without it, a model "
                   "no native class computes is exported as remote code")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="turn a Hugging Face folder, a GGUF file or CodeMind weights into an slmforge "
                       "checkpoint folder")
    p.add_argument("src", help="a Hugging Face folder (config.json, model.safetensors or shards, tokenizer.json: "
                   "Llama, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE or DeepseekV3), a GGUF file (llama, qwen2moe, "
                   "qwen3moe, deepseek2), or with --from codemind their weights")
    p.add_argument("out", help="the checkpoint folder to write")
    p.add_argument("--from", dest="source_format", choices=["hf", "gguf", "codemind"],
                   help="hf: a Hugging Face folder; gguf: a llama.cpp file; codemind: a CodeMind model.safetensors "
                   "(or its step folder). Default: gguf for a .gguf file, else hf")
    p.add_argument("--codemind-config", metavar="JSON", help="with --from codemind: their CodeMindConfig values "
                   "(fields left out take their defaults)")
    p.add_argument("--tokenizer", help="with --from codemind: a tokenizer.json (or folder) for the checkpoint")
    p.add_argument("--force", action="store_true", help="replace an existing output (once the new one is complete)")
    p.set_defaults(func=cmd_import)
