"""`slmforge train`."""

from __future__ import annotations

from pathlib import Path


def _recipe_card(run: Path) -> None:
    """A recipe's run ends with its model card, RUN/README.md, refreshed on each run; a README.md the user
    wrote there is left alone."""
    from slmforge.card import write_card
    from slmforge.train.run_folder import is_generated_card

    readme = run / "README.md"
    if readme.exists() and not is_generated_card(readme):
        print(f"{readme} is not a card slmforge wrote: left as it is (slmforge card {run} --out FILE writes one)")
        return
    card, _ = write_card(run, force=True)
    print(f"model card: {card}")


def cmd_train(args) -> None:
    from slmforge.config import load_config
    from slmforge.train import train

    overrides = list(args.set)
    if args.data:
        overrides.insert(0, f"data.path={Path(args.data).resolve()}")  # eval/sample may run elsewhere
    if args.init:
        overrides.insert(0, f"train.init={Path(args.init).resolve()}")
    if args.recipe:
        from slmforge.recipes import run_recipe

        report = run_recipe(args.recipe, args.out, overrides, full=args.full, resume=args.resume, fresh=args.fresh,
                            allow_changes=args.allow_changes)
        _recipe_card(Path(args.out))
    else:
        cfg = load_config(args.config or args.preset, overrides)
        report = train(cfg, args.out, resume=args.resume, fresh=args.fresh, allow_changes=args.allow_changes)
    for phase in report["phases"]:
        if phase.get("val_loss") is None:  # no evaluation recorded at the phase's end
            continue
        start = f"{phase['start_val_loss']:.4f} -> " if phase.get("start_val_loss") is not None else ""
        rewards = (f"; held-out reward accuracy {phase['val_reward_accuracy']:.3f}, margin "
                   f"{phase['val_reward_margin']:.3f}" if phase.get("val_reward_accuracy") is not None else "")
        print(f"phase {phase['name']}: val loss {start}{phase['val_loss']:.4f} (bits per byte {phase['val_bpb']:.4f})"
              f"{rewards}")
    print(train_summary(report))


def train_summary(report: dict) -> str:
    """The one line `train` ends with: final validation figures, tokens, wall time, training throughput."""
    val = ""
    if report.get("val_loss") is not None:
        val = (f"val loss {report['val_loss']:.4f}, perplexity {report['val_ppl']:.2f}, "
               f"bits per byte {report['val_bpb']:.4f}; ")
    speed = f", {report['tokens_per_s']:,.0f} tokens/s training" if report.get("tokens_per_s") else ""
    return (f"final: {val}{report['tokens']:,} tokens seen in {report['elapsed_s']:.0f} s{speed}; "
            f"checkpoint {report['checkpoint']}")


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (also under torchrun for DDP)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", help="a preset name (see `slmforge info`)")
    which.add_argument("--config", help="a YAML/JSON config file")
    which.add_argument("--recipe", help="a seed card's recipe (slmforge/recipes/): prepares its tokenizer and "
                       "data once, then trains")
    p.add_argument("--full", action="store_true", help="with --recipe: the card's full size (for a GPU)")
    p.add_argument("--init", metavar="CHECKPOINT", help="start from these weights (a checkpoint or run folder, e.g. "
                   "one written by `slmforge import`); the run's model is that checkpoint's (sets train.init)")
    p.add_argument("--data", help="a folder written by `slmforge data prepare` (sets data.path)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. model.n_layers=4")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue although settings that change training differ from the checkpoint's")
    p.add_argument("--fresh", action="store_true", help="delete an existing run folder first (only a slmforge run "
                   "folder: anything else is refused)")
    p.set_defaults(func=cmd_train)
