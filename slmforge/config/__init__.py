"""One dataclass tree for a run: model, data, optimizer, schedule, training and phases.

A config is built from a YAML preset shipped in `slmforge/presets/` or a YAML/JSON file, then
`--set a.b=value` overrides are applied to the raw mapping before validation, so every error names the
key it came from and is raised before any tensor exists. The resolved tree is what `config.json` in a
checkpoint holds: every choice that changes the math is an explicit field.
"""

from slmforge.config.checks import check_vocab, validate, validate_model
from slmforge.config.loading import (
    apply_overrides,
    deep_merge,
    find_yaml,
    from_dict,
    list_presets,
    list_yaml,
    load_config,
    load_raw,
    read_mapping,
    with_base,
)
from slmforge.config.tree import (
    FORMAT_VERSION,
    PRESET_DIR,
    ConfigError,
    DataConfig,
    DistillConfig,
    LoraConfig,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    MultiScaleConfig,
    RopeScalingConfig,
    OptimConfig,
    PhaseConfig,
    PreferenceConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
)

__all__ = [
    "FORMAT_VERSION",
    "PRESET_DIR",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "LoraConfig",
    "MLAConfig",
    "MoEConfig",
    "MultiScaleConfig",
    "RopeScalingConfig",
    "ModelConfig",
    "OptimConfig",
    "PhaseConfig",
    "PreferenceConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "deep_merge",
    "find_yaml",
    "check_vocab",
    "from_dict",
    "list_presets",
    "list_yaml",
    "load_config",
    "load_raw",
    "read_mapping",
    "with_base",
    "validate",
    "validate_model",
]
