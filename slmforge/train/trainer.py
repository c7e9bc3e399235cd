"""The training loop: phases of optimizer steps with evaluation, checkpoints, guards and exact resume.

A run folder:

    RUN/
      config.json            the resolved RunConfig of the latest session
      metrics.jsonl          one JSON line per optimizer step and per evaluation (fields below)
      report.json            what train() returned
      <phase>/step_N/        checkpoints after N steps of a phase (layout: slmforge/checkpoint/folder.py);
                             a run without `phases` has the single phase "main": RUN/main/step_N

Phase k > 0 starts from phase k-1's final weights and optimizer state, with its own data, optimizer
hyperparameters and schedule; its step counter (and schedule) restart at 0, tokens keep counting.

metrics.jsonl, training lines: step (steps done in the phase), phase, loss (the total), ce_loss, z_loss,
any model aux losses, lr {group name: lr}, grad_norm (before clipping), tokens (seen so far, all
processes), tokens_per_s, dt, skipped; plus min_singular_ratio / rank_warnings on rank checks.
Evaluation lines: step, phase, tokens, val_loss, val_ppl, val_bpb; on preference data also
val_dpo_loss, val_reward_accuracy, val_reward_margin (held-out pairs).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from slmforge.checkpoint.folder import (
    ADAPTER_FILE,
    find_checkpoint,
    latest_checkpoint,
    load_weights,
    read_config,
    read_trainer_state,
    remove_unfinished,
    restore_rng,
    save_checkpoint,
)
from slmforge.checkpoint.integrity import CheckpointError, read_json, read_tensors, write_json_atomic
from slmforge.config import ConfigError, PhaseConfig, RunConfig
from slmforge.data.loader import training_batches, validation_batches
from slmforge.hardware import autocast, choose_dtype, choose_threads
from slmforge.model import build_model
from slmforge.model.lora import adapter_tensors, load_adapters, merged_state_dict
from slmforge.optim import (
    build_optimizers,
    load_optimizer_state,
    lr_factor,
    optimizer_state_tensors,
    param_groups_summary,
    set_lr,
)
from slmforge.tokenizer import Tokenizer
from slmforge.train import distributed
from slmforge.train.errors import TrainingError
from slmforge.train.guards import check_skips, rank_check
from slmforge.train.init_weights import add_adapters, load_init_weights
from slmforge.train.metrics import MetricsLog, json_safe, load_metrics, log
from slmforge.train.objective import build_objective
from slmforge.train.report import run_report
from slmforge.train.run_folder import check_run_dir, config_changes, prepare_run_dir
from slmforge.train.setup import micro_step_flops, open_data, packs_rows, with_init_model


@dataclass
class Progress:
    """Where a run stands; saved in each checkpoint's state.json."""

    phase_index: int = 0
    step: int = 0  # optimizer steps done in the current phase; also the data position (the loader is stateless)
    tokens: int = 0
    consecutive_skips: int = 0
    skipped_steps: int = 0
    best_val_loss: float | None = None
    last_val_loss: float | None = None


# ----------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    def __init__(self, cfg: RunConfig, out: Path, d: distributed.Dist, datasets: list, tokenizer: Tokenizer):
        self.cfg, self.out, self.d = cfg, out, d
        self.phases = cfg.run_phases()
        self.datasets, self.tokenizer = datasets, tokenizer
        self.dtype, self.dtype_reason = choose_dtype(cfg.train.dtype, d.device)
        self.threads, self.threads_reason = None, "on a GPU"
        if d.device.type == "cpu":
            self.threads, self.threads_reason = choose_threads(cfg.train.threads, micro_step_flops(cfg))
            torch.set_num_threads(self.threads)
        self.autocast = autocast(d.device, self.dtype)
        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank and every run
        self.model = build_model(cfg.model).to(d.device)
        self.adapted: list[str] = []  # the modules LoRA adapts (config `lora`), over the frozen init weights
        if cfg.lora.rank:  # the frozen base is the init checkpoint's, whether the run starts or resumes
            load_init_weights(self.model, Path(cfg.train.init), self.log)
            self.adapted = add_adapters(self.model, cfg.lora, self.log)
        self.ddp = distributed.wrap(self.model, d)
        self.train_model = torch.compile(self.ddp) if cfg.train.compile else self.ddp
        self.objective = build_objective(cfg, datasets, d.device, self.log)
        self.byte_lengths = tokenizer.token_byte_lengths()
        self.metrics = MetricsLog(out / "metrics.jsonl", d.is_main)
        self.progress = Progress()
        self.started = False  # an optimizer step has been taken: the run folder holds something of value

    def log(self, message: str) -> None:
        log(message, self.d.is_main)

    # --- resume ---

    def restore(self, checkpoint: Path, allow_changes: bool) -> tuple[dict, dict]:
        """Load weights, progress and RNG from `checkpoint`; return its optimizer state (tensors, meta)."""
        saved = read_config(checkpoint)
        if saved.model != self.cfg.model:
            ours = dataclasses.asdict(self.cfg.model)
            diffs = [f"model.{k}: checkpoint {v!r}, config {ours[k]!r}"
                     for k, v in dataclasses.asdict(saved.model).items() if ours[k] != v]
            raise ConfigError(f"cannot resume from {checkpoint}: the model config differs ({'; '.join(diffs)})")
        state, optimizer_tensors, rng = read_trainer_state(checkpoint)
        changes = config_changes(saved, state.get("world_size", 1), self.cfg, self.d.world_size)
        if changes and not allow_changes:
            raise TrainingError(f"--resume would not continue {checkpoint} exactly, these settings changed: "
                                 f"{'; '.join(changes)}. Pass --allow-changes to resume with them anyway")
        if changes:
            self.log(f"resuming with changed settings: {'; '.join(changes)}")
        index = state["phase_index"]
        if index >= len(self.phases) or self.phases[index].name != state["phase"]:
            names = [p.name for p in self.phases]
            raise ConfigError(
                f"cannot resume from {checkpoint}: its phase '{state['phase']}' is not phase {index} of {names}"
            )
        if self.adapted:  # the frozen base came from train.init; the checkpoint's model.safetensors is merged
            load_adapters(self.model, read_tensors(checkpoint / ADAPTER_FILE), str(checkpoint / ADAPTER_FILE))
        else:
            load_weights(self.model, read_tensors(checkpoint / "model.safetensors"),
                         str(checkpoint / "model.safetensors"))
        restore_rng(rng)
        fields = {f.name for f in dataclasses.fields(Progress)}
        self.progress = Progress(**{k: v for k, v in state.items() if k in fields})
        order = {p.name: i for i, p in enumerate(self.phases)}
        at = (index, self.progress.step)
        self.metrics.resume(lambda line: (order.get(line.get("phase"), -1), line.get("step", 0)) <= at)
        if self.progress.step >= self.phases[index].steps:  # the checkpoint ends its phase: start the next
            self.progress.phase_index, self.progress.step = index + 1, 0
        self.log(f"resuming from {checkpoint} ({self.progress.tokens:,} tokens seen)")
        return optimizer_tensors, state["optimizer"]

    def build_optimizers(self, phase: PhaseConfig, state: tuple[dict, dict] | None) -> list:
        """The phase's optimizers, with moments and step counts from `state` (a checkpoint or the previous
        phase) but hyperparameters (lr, betas, weight decay) from the phase's own config."""
        optimizers = build_optimizers(self.model, phase.optim)
        if state is None:
            return optimizers
        configured = [[{k: v for k, v in g.items() if k != "params"} for g in o.param_groups] for o in optimizers]
        try:
            load_optimizer_state(optimizers, *state)
        except ValueError as e:
            if self.progress.step > 0:  # resuming inside a phase: the state must fit
                raise CheckpointError(f"the checkpoint's optimizer state does not fit phase '{phase.name}': {e}") from e
            self.log(f"phase {phase.name}: optimizer layout changed ({e}); its optimizer state starts fresh")
            return build_optimizers(self.model, phase.optim)
        for opt, groups in zip(optimizers, configured):
            for group, hyper in zip(opt.param_groups, groups):
                group.update(hyper)
        return optimizers

    # --- one optimizer step ---

    def train_step(self, phase: PhaseConfig, optimizers: list, batches, step: int) -> dict:
        set_lr(optimizers, lr_factor(step, phase.steps, phase.schedule))
        accum = self.cfg.train.grad_accum
        micro_batches = [batches.get(step, micro) for micro in range(accum)]
        # each micro-batch's mean loss weighs by its share of the step's scored tokens (or pairs) over all
        # processes, so that the step minimises their mean whatever the accumulation and the process count;
        # DDP's gradient average divides by world_size, which the weights multiply back
        counts = torch.tensor([self.objective.averaged_over(b) for b in micro_batches], dtype=torch.float64)
        step_count = distributed.all_reduce_sum(counts.sum().to(self.d.device), self.d).item()
        weights = (counts * self.d.world_size / max(step_count, 1.0)).tolist()
        totals: dict[str, torch.Tensor] = {}
        expert_load = None  # [n_moe_layers, n_experts] tokens routed over the step (MoE models)
        dropped = rows_tokens = 0
        for micro, (batch, weight) in enumerate(zip(micro_batches, weights)):
            batch = batch.to(self.d.device, non_blocking=True)
            rows_tokens += batch.tokens.numel()  # a preference batch holds two rows per pair
            with distributed.grad_sync(self.ddp, sync=micro == accum - 1):
                with self.autocast:
                    loss, parts, aux = self.objective(self.train_model, batch)
                (loss * weight).backward()
            for name, value in {"loss": loss.detach(), **parts}.items():
                totals[name] = totals.get(name, 0) + value * weight
            if "expert_load" in aux:
                expert_load = aux["expert_load"] if expert_load is None else expert_load + aux["expert_load"]
                dropped += aux["expert_dropped"]
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        losses = distributed.all_reduce_mean(torch.stack(list(totals.values())).float(), self.d).tolist()
        record = dict(zip(totals, losses))
        record["grad_norm"] = grad_norm.item()
        record["skipped"] = not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]))
        if not record["skipped"]:
            if phase.optim.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, phase.optim.grad_clip, grad_norm)
            for opt in optimizers:
                opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if expert_load is not None:
            expert_load = distributed.all_reduce_sum(expert_load.float(), self.d)
            if not record["skipped"]:  # every rank applies the same update: the biases stay identical
                self.model.update_routing_biases(expert_load)
            record.update(load_metrics(expert_load), moe_dropped_tokens=dropped)
        record["lr"] = {g["name"]: g["lr"] for opt in optimizers for g in opt.param_groups}
        record["step_tokens"] = rows_tokens * self.d.world_size  # every rank's rows have the same shape
        return record

    # --- evaluation and checkpoints ---

    def local_val_batches(self, index: int) -> list:
        """This rank's rows of phase `index`'s validation set: batches of the global batch size, split like
        training batches, so the val figures do not depend on the number of processes."""
        phase, b, rank = self.phases[index], self.phases[index].data.batch_size, self.d.rank
        val = validation_batches(self.datasets[index], phase.data.seq_len, b * self.d.world_size,
                                 self.cfg.train.eval_batches, phase.data.weights or None, packs_rows(self.cfg, index))
        return [batch.share(rank * b, (rank + 1) * b) for batch in val if batch.examples > rank * b]

    def evaluate(self, phase: PhaseConfig, val: list) -> dict:
        """Validation figures over all ranks, each evaluating its rows of the validation set."""
        sums = self.objective.validation_sums(self.model, val, self.byte_lengths, self.autocast)
        result = self.objective.validation_figures(distributed.all_reduce_sum(sums, self.d))
        p = self.progress
        p.last_val_loss = result["loss"]
        p.best_val_loss = min(p.best_val_loss if p.best_val_loss is not None else math.inf, result["loss"])
        self.metrics.write(step=p.step, phase=phase.name, tokens=p.tokens, **{f"val_{k}": v for k, v in result.items()})
        return result

    def save(self, phase: PhaseConfig, optimizers: list) -> Path:
        folder = self.out / phase.name / f"step_{self.progress.step}"
        if self.d.is_main:
            tensors, meta = optimizer_state_tensors(optimizers)
            state = {**dataclasses.asdict(self.progress), "phase": phase.name, "phase_steps": phase.steps,
                     "data_position": self.progress.step, "world_size": self.d.world_size, "optimizer": meta}
            model_state, adapter = self.model.state_dict(), None
            if self.adapted:
                model_state = merged_state_dict(self.model)
                adapter = (adapter_tensors(self.model), {**dataclasses.asdict(self.cfg.lora), "modules": self.adapted,
                                                        "base": self.cfg.train.init})
            save_checkpoint(folder, cfg=self.cfg, model_state=model_state, tokenizer=self.tokenizer,
                            optimizer_tensors=tensors, state=state, keep_last=self.cfg.train.keep_last, adapter=adapter)
        distributed.barrier(self.d)  # no rank runs ahead of a checkpoint still being written
        return folder

    # --- phases ---

    def run_phase(self, index: int, optimizer_state: tuple[dict, dict] | None) -> tuple[dict, dict]:
        """Train phase `index` from self.progress.step to its end; return its final optimizer state."""
        phase, dataset, t, d = self.phases[index], self.datasets[index], self.cfg.train, self.d
        optimizers = self.build_optimizers(phase, optimizer_state)
        groups = [f"{g['group']} ({g['params']:,} params, lr {g['lr']:g})" for g in param_groups_summary(optimizers)]
        self.log(f"phase {phase.name}: {phase.steps} steps on {phase.data.path}; optimizer groups: {', '.join(groups)}")
        # a phase seed of its own, so a phase on the same data does not replay the previous phase's rows
        batches = training_batches(dataset, phase.data.seq_len, phase.data.batch_size, seed=t.seed + index,
                                   rank=d.rank, world_size=d.world_size, weights=phase.data.weights or None,
                                   grad_accum=t.grad_accum, pack=packs_rows(self.cfg, index))
        self.log(f"phase {phase.name}: {batches.describe()}")
        val = self.local_val_batches(index)
        if self.progress.step == 0:  # the starting point, so a run shows how far its loss fell
            start_val = self.evaluate(phase, val)["loss"]
            self.log(f"{phase.name} step 0: val_loss {start_val:.4f}")
        with tqdm(total=phase.steps, initial=self.progress.step, desc=phase.name, unit="step",
                  disable=not d.is_main, dynamic_ncols=True) as bar:
            self.run_steps(phase, optimizers, batches, val, bar)
        return optimizer_state_tensors(optimizers)

    def run_steps(self, phase: PhaseConfig, optimizers: list, batches, val: list, bar: tqdm) -> None:
        """The optimizer steps of a phase from self.progress.step to its end, with evaluations and checkpoints."""
        t, d = self.cfg.train, self.d
        for step in range(self.progress.step, phase.steps):
            t0 = time.perf_counter()
            record = {"step": step + 1, "phase": phase.name, **self.train_step(phase, optimizers, batches, step)}
            dt = time.perf_counter() - t0
            self.started = True
            self.progress.step = done = step + 1
            step_tokens = record.pop("step_tokens")
            self.progress.tokens += step_tokens
            record.update(tokens=self.progress.tokens, tokens_per_s=step_tokens / dt, dt=dt)
            if t.rank_check_every and done % t.rank_check_every == 0 and d.is_main:
                rank_check(record, optimizers, t.rank_warn_ratio, self.log)
            self.metrics.write(**record)
            check_skips(self.progress, record, self.cfg, phase, done, self.log)
            bar.update()
            if done % t.log_every == 0:
                lr = next(iter(record["lr"].values()))
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}")
            last = done == phase.steps
            if done % t.eval_every == 0 or last:
                result = self.evaluate(phase, val)
                shown = ", ".join(f"val_{k} {v:.4f}" for k, v in result.items() if k != "ppl")
                self.log(f"{phase.name} step {done}: {shown}")
            if done % t.save_every == 0 or last:
                self.save(phase, optimizers)

    def run(self, resume: bool, allow_changes: bool = False) -> dict:
        start = time.perf_counter()
        optimizer_state, checkpoint = None, None
        if self.d.is_main:  # temporary folders of checkpoints whose writer was killed
            for phase in self.phases:
                remove_unfinished(self.out / phase.name)
        if resume and latest_checkpoint(self.out) is not None:
            checkpoint = find_checkpoint(self.out, trainer_state=True, warn=self.log)
            optimizer_state = self.restore(checkpoint, allow_changes)
        elif resume:
            self.log(f"--resume: no checkpoint in {self.out}, starting from scratch")
            self.metrics.resume(lambda line: False)
        if checkpoint is None and self.cfg.train.init and not self.adapted:  # verified by with_init_model
            load_init_weights(self.model, Path(self.cfg.train.init), self.log)
        if self.progress.phase_index == len(self.phases):
            return self.finished_report(checkpoint, start)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"{n_params:,} parameters on {self.d.device} x{self.d.world_size}; {self.dtype_reason}; "
                 f"{self.threads_reason}")
        if self.d.is_main:
            self.cfg.save(self.out / "config.json")
        for index in range(self.progress.phase_index, len(self.phases)):
            if index > self.progress.phase_index:
                self.progress.phase_index, self.progress.step = index, 0
            optimizer_state = self.run_phase(index, optimizer_state)
        return self.write_report(start)

    def finished_report(self, checkpoint: Path, start: float) -> dict:
        """Resuming a run that has ended trains nothing and keeps its report (rebuilt only if it is lost)."""
        self.log(f"the run is complete: {checkpoint} ends its last phase, so there is nothing to train")
        try:
            report = read_json(self.out / "report.json")
        except CheckpointError as e:
            self.log(f"{e}; writing it again from metrics.jsonl")
            return self.write_report(start)
        self.log(f"{self.out / 'report.json'} is left as it was")
        return report

    def write_report(self, start: float) -> dict:
        """The run's report, per phase from every session's metrics lines, written to RUN/report.json."""
        facts = {"parameters": sum(p.numel() for p in self.model.parameters()), "device": str(self.d.device),
                 "world_size": self.d.world_size, "dtype": str(self.dtype).removeprefix("torch."),
                 "dtype_reason": self.dtype_reason, "threads": self.threads,
                 "elapsed_s": time.perf_counter() - start}
        report = run_report(self.out, self.phases, self.metrics.lines, self.progress, facts)
        if self.d.is_main:
            write_json_atomic(self.out / "report.json", json_safe(report))
        return report

def train(cfg: RunConfig, out_dir, resume: bool = False, fresh: bool = False, allow_changes: bool = False) -> dict:
    """Train `cfg` into run folder `out_dir`; return the final report (also written to RUN/report.json).

    resume: continue from the run's newest intact checkpoint (exactly: same losses as an uninterrupted run),
    refusing changed settings unless `allow_changes`; fresh: delete `out_dir` first, which must be a run
    folder. Under torchrun (WORLD_SIZE > 1) this is data parallel. A run that fails before its first
    optimizer step leaves no folder behind it created.
    """
    out = Path(out_dir)
    check_run_dir(out, resume, fresh)
    cfg, datasets, tokenizer = open_data(with_init_model(cfg))
    d = distributed.setup()
    created = not out.exists()
    trainer, threads = None, torch.get_num_threads()
    try:
        prepare_run_dir(out, fresh, d)
        trainer = Trainer(cfg, out, d, datasets, tokenizer)
        return trainer.run(resume, allow_changes)
    except BaseException:
        if created and d.is_main and (trainer is None or not trainer.started):
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if trainer is not None:
            trainer.metrics.close()
        torch.set_num_threads(threads)  # the caller's setting again (the trainer chose its own)
        distributed.teardown(d)
