"""The dataclass tree of a run: model (with its attention, feed-forward, residual and MTP parts), data,
optimizer, schedule, training and phases."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
PRESET_DIR = Path(__file__).parent.parent / "presets"


class ConfigError(ValueError):
    """A configuration problem, always naming the offending key."""


@dataclass
class RopeScalingConfig:
    """RoPE frequencies for contexts longer than pretraining's (model.rope_scaling), as transformers names them:
    "none"; "linear" (every frequency / factor); "ntk" (the base scaled by factor^(d/(d-2)), static); "yarn"
    (frequencies between beta_slow and beta_fast rotations over original_max_len blended from interpolated to
    extrapolated, cos and sin multiplied by attention_factor, by default 0.1 ln(factor) + 1)."""

    kind: str = "none"
    factor: float = 1.0
    original_max_len: int = 0  # yarn: the pretraining context the correction range is measured against
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # yarn: None is 0.1 ln(factor) + 1 (transformers' default)


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3), used when model.attention == "mla"."""

    q_lora_rank: int = 0  # 0: queries projected directly from d_model; else through a latent of this rank
    kv_lora_rank: int = 512  # the compressed key/value latent: all the cache keeps (with the RoPE key)
    qk_head_dim: int = 128  # query/key channels per head from the latent (DeepSeek's qk_nope_head_dim)
    rope_head_dim: int = 64  # decoupled RoPE key channels, shared by the heads; 0 with rope_mode whole_head
    v_head_dim: int = 128
    latent_norm: bool = True  # RMSNorm on the query and key/value latents
    # "decoupled": RoPE on separate rope_head_dim channels (DeepSeek); "whole_head": RoPE on the whole
    # up-projected qk head and no separate key (Axion1)
    rope_mode: str = "decoupled"


@dataclass
class MoEConfig:
    """Routed SwiGLU experts (DeepSeek-V3 / Qwen2-MoE), used when model.ffn == "moe"."""

    n_experts: int = 8
    top_k: int = 2
    expert_d_ff: int = 1024
    shared_d_ff: int = 0  # width of the always-active shared expert; 0: none
    shared_gate: bool = False  # multiply the shared expert's output by sigmoid(w . x) (Qwen2-MoE)
    score: str = "softmax"  # "softmax" | "sigmoid": router scores before top-k
    norm_topk: bool = False  # renormalise the chosen k weights to sum to 1
    route_scale: float = 1.0  # multiplies the combined routed output
    first_dense_layers: int = 0  # the first k layers use a dense SwiGLU of width model.d_ff
    # Auxiliary-loss-free balancing: after each optimizer step b_i += rate * sign(mean load - load_i);
    # b is added to the scores for expert selection only. 0 disables it.
    bias_update_rate: float = 1e-3
    balance_loss: float = 0.0  # sequence-wise balance loss coefficient alpha (0: off)


@dataclass
class MultiScaleConfig:
    """The multi-scale byte transformer (AXL-Code), used when model.arch == "multiscale": parallel causal
    stacks over the sequence downsampled by each factor, cross-scale attention, per-position fusion."""

    scales: list[int] = field(default_factory=lambda: [1, 2, 4])  # downsampling factor of each stack
    layers_per_scale: int = 6
    cross_layers: int = 2  # rounds of cross-scale attention between every ordered pair of scales


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 512
    n_layers: int = 12
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: same as n_heads (MHA); 1: MQA
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 2048
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    rope_layout: str = "half"  # "half": rotate-half (Llama/HF, NEOX); "pairs": adjacent pairs (GPT-J)
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    qk_norm: bool = False
    tie_embeddings: bool = True
    bias: bool = False
    qkv_bias: bool = False  # biases on the query, key and value projections only (Qwen2); implied by bias
    # Attention kind per layer, cycled over the layers: "global" or "sliding" (window `sliding_window`).
    attention_pattern: list[str] = field(default_factory=lambda: ["global"])
    sliding_window: int = 1024
    last_layer_global: bool = True
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    init_std: float = 0.02
    attention: str = "gqa"  # "gqa" (MHA / GQA / MQA through n_kv_heads) | "mla"
    mla: MLAConfig = field(default_factory=MLAConfig)
    ffn: str = "dense"  # "dense" (SwiGLU of width d_ff) | "moe"
    moe: MoEConfig = field(default_factory=MoEConfig)
    # "add": h + f(h); "attnres_full" / "attnres_block": Kimi attention residuals over every sublayer
    # output / over block sums of `residual_blocks` blocks; "attnres_codemind": CodeMind's variant
    residual: str = "add"
    residual_blocks: int = 8
    mtp_depth: int = 0  # number of sequential multi-token-prediction modules (DeepSeek-V3)
    arch: str = "decoder"  # "decoder": one stack of n_layers; "multiscale": see `multiscale`
    multiscale: MultiScaleConfig = field(default_factory=MultiScaleConfig)

    def layer_windows(self) -> list[int | None]:
        """Attention window of each layer: None for global attention."""
        kinds = [self.attention_pattern[i % len(self.attention_pattern)] for i in range(self.n_layers)]
        if self.last_layer_global:
            kinds[-1] = "global"
        return [self.sliding_window if k == "sliding" else None for k in kinds]

    def layer_is_moe(self, index: int) -> bool:
        """Whether layer `index` (n_layers.. for MTP blocks) has a routed-expert feed-forward."""
        return self.ffn == "moe" and index >= self.moe.first_dense_layers

    def rope_dim(self) -> int:
        """Channels per head that RoPE rotates."""
        if self.attention != "mla":
            return self.head_dim
        return self.mla.rope_head_dim if self.mla.rope_mode == "decoupled" else self.mla.qk_head_dim


@dataclass
class DataConfig:
    path: str | None = None  # a folder written by `slmforge data prepare`
    weights: dict[str, float] = field(default_factory=dict)  # mixture override; empty: the folder's own
    seq_len: int = 512
    batch_size: int = 8  # sequences per micro-batch per process
    # chat data (`data prepare --chat`): "pack" puts whole conversations side by side in a row, attending
    # only within each; "pad" gives each its own row; "auto" packs where the model can (not the multi-scale one)
    packing: str = "auto"


@dataclass
class OptimConfig:
    name: str = "muon"  # "muon": Muon on hidden 2-D weights + `others` on the rest; or one of adamw, lion, sgd alone
    others: str = "adamw"  # with name "muon": the optimizer of everything Muon does not take (adamw, lion, sgd)
    # lr of the adamw / lion / sgd groups (Muon has muon_lr). Lion moves every weight by ±lr per step: give it
    # an lr 3-10x smaller and a weight_decay 3-10x larger than AdamW's (e.g. 3e-4 and 0.3 for 3e-3 and 0.1)
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0  # <opt>_matrices only; decoupled for AdamW and Lion, L2 on the gradient for SGD
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_weight_decay: float = 0.0
    muon_adjust_lr: str = "original"  # "original": sqrt(max(1, rows/cols)); "match_rms_adamw": 0.2*sqrt(max(rows, cols))
    lion_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    sgd_momentum: float = 0.9
    sgd_nesterov: bool = True
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class ScheduleConfig:
    name: str = "wsd"  # "wsd" | "cosine" | "constant"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying
    decay_shape: str = "linear"  # wsd: "linear" or "sqrt" (1 - sqrt)
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 1000
    grad_accum: int = 1
    seed: int = 1337
    dtype: str = "auto"  # "auto": bf16 autocast where the hardware has fast bf16, else fp32; "bf16"; "fp32"
    compile: bool = False
    z_loss: float = 1e-4
    mtp_weight: float = 0.3  # lambda: loss = CE + lambda * mean of the MTP modules' CE (+ z-loss, balance)
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 500
    keep_last: int = 3
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    rank_check_every: int = 0  # 0: off; else estimate Muon matrices' smallest singular value every N steps
    rank_warn_ratio: float = 1e-3  # warn when sigma_min / sigma_max falls below this
    threads: int = 0  # torch intra-op threads; 0: chosen from the model's size (small models lose time to more threads)
    # a checkpoint or run folder whose weights the run starts from (fine-tuning, continued pretraining); the
    # run's model section is then that checkpoint's
    init: str | None = None


@dataclass
class LoraConfig:
    """Low-rank adapters: each targeted projection's weight W trains as W + (alpha / rank) B A, with W frozen
    (Hu et al., 2021). Needs train.init; checkpoints hold the merged weights and the adapters apart."""

    rank: int = 0  # 0: off, every weight trains
    alpha: float = 16.0
    # nn.Linear modules whose name ends in one of these (q/k/v/o and the SwiGLU's three by default; MLA's are
    # q_proj or q_a_proj/q_b_proj, kv_a_proj, kv_b_proj); routed experts' stacked weights are not adapted
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])


@dataclass
class DistillConfig:
    """Knowledge distillation: the student also learns the teacher's next-token distribution (forward KL at
    a temperature, scaled by its square as Hinton et al. do), mixed with the data's cross-entropy."""

    teacher: str | None = None  # a checkpoint or run folder with the student's vocabulary; None: off
    temperature: float = 1.0
    weight: float = 0.5  # the KL term's share of the loss; the data's cross-entropy keeps 1 - weight


@dataclass
class PreferenceConfig:
    """Direct preference optimisation (DPO, Rafailov et al., 2023), on data from `data prepare --preference`."""

    beta: float = 0.1  # how far the policy may move from the reference: larger keeps it closer
    reference: str | None = None  # the frozen reference model (default: train.init, the model being tuned)


@dataclass
class PhaseConfig:
    """One phase of a run (e.g. pretrain, then anneal). Unset parts are inherited from the top level."""

    name: str = "main"
    steps: int = 1000
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    phases: list[PhaseConfig] = field(default_factory=list)
    lora: LoraConfig = field(default_factory=LoraConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def run_phases(self) -> list[PhaseConfig]:
        """The phases to run; a run without phases is one phase named 'main'."""
        if self.phases:
            return self.phases
        return [PhaseConfig("main", self.train.steps, self.data, self.optim, self.schedule)]
