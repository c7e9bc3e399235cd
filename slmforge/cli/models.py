"""`slmforge info`: what a preset, config or checkpoint is."""

from __future__ import annotations

from pathlib import Path

from slmforge.cli.args import POSITIVE_INT


def cmd_info(args) -> None:
    from slmforge.config import load_config
    from slmforge.model.stats import format_stats, model_stats
    from slmforge.checkpoint import find_checkpoint, read_config

    target = args.target
    if target is None:
        print(presets_table())
        return
    if args.targets:
        from slmforge.export.targets import format_targets, model_of

        print(format_targets(*model_of(target)))
        return
    if Path(target).is_dir():
        from slmforge.config import apply_overrides, from_dict

        checkpoint = find_checkpoint(target)
        cfg = from_dict(apply_overrides(read_config(checkpoint).to_dict(), args.set))
        name = str(checkpoint)
    else:
        cfg, name = load_config(target, args.set), target
    print(format_stats(name, model_stats(cfg.model, args.context)))


def presets_table() -> str:
    """One line per shipped preset: total and active parameters, KV cache per token."""
    from slmforge.config import list_presets, load_config
    from slmforge.model.stats import model_stats

    rows = [("preset", "parameters", "active/token", "KV bytes/token (bf16)")]
    for name in list_presets():
        s = model_stats(load_config(name).model)
        rows.append((name, f"{s['total_params']:,}", f"{s['active_params_per_token']:,}",
                     f"{s['kv_bytes_per_token_bf16']:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def register(sub) -> None:
    p = sub.add_parser("info", help="parameters, FLOPs, KV-cache and memory of a preset, config file or run")
    p.add_argument("target", nargs="?", help="preset name, config file, run folder or checkpoint folder "
                   "(none: a table of every preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--context", type=POSITIVE_INT, default=None, help="context length for FLOPs/KV figures")
    p.add_argument("--targets", action="store_true", help="the export targets (hf-native, hf-remote, gguf, "
                   "ollama) the model can reach, and why not")
    p.set_defaults(func=cmd_info)
