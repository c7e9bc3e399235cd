"""`slmforge export RUN --to hf OUT` for a model no native class computes: a self-contained remote-code
folder that `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` loads where slmforge is not
installed.

The model code in the folder is slmforge's own: every module of `slmforge/model/` (and the config
dataclasses it reads) is copied beside the weights with its `slmforge.` imports made relative, so the
exported model computes exactly what slmforge computes and cannot drift from it. Two small files adapt it
to transformers: `configuration_slmforge.py` (the slmforge model config inside a PretrainedConfig) and
`modeling_slmforge.py` (a PreTrainedModel + GenerationMixin whose generate() decodes with slmforge's own
slot cache, wrapped in transformers' Cache type).
"""

from __future__ import annotations

import re
from pathlib import Path

import slmforge.config.tree
import slmforge.model

MODEL_DIR = Path(slmforge.model.__file__).parent
LEFT_OUT = {"__init__.py", "stats.py"}  # the package's re-exports, and figures computed on the meta device
IMPORT = re.compile(r"^from slmforge\.(model\.(\w+)|config) import", re.MULTILINE)

CONFIGURATION = '''"""slmforge's model config inside a transformers PretrainedConfig (written by `slmforge export`)."""

from transformers import PretrainedConfig


class SlmforgeConfig(PretrainedConfig):
    model_type = "slmforge"

    def __init__(self, slmforge: dict | None = None, **kwargs):
        self.slmforge = slmforge or {}  # the `model` section of the slmforge checkpoint's config.json
        kwargs["tie_word_embeddings"] = False  # a tied head is tied inside slmforge's own model
        super().__init__(**kwargs)
'''

MODELING = '''"""slmforge's model as a transformers PreTrainedModel (written by `slmforge export`). The model code is in
the slmforge_*.py files beside this one: slmforge's own modules, copied with their imports made relative."""

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_slmforge import SlmforgeConfig
from .slmforge_config import MLAConfig, ModelConfig, MoEConfig, MultiScaleConfig, RopeScalingConfig
from .slmforge_multiscale import MultiScaleTransformer
from .slmforge_rope import RotaryEmbedding
from .slmforge_transformer import Transformer

_PARTS = {"mla": MLAConfig, "moe": MoEConfig, "multiscale": MultiScaleConfig, "rope_scaling": RopeScalingConfig}


def model_config(raw: dict) -> ModelConfig:
    return ModelConfig(**{k: _PARTS[k](**v) if k in _PARTS else v for k, v in raw.items()})


class SlmforgeCache(Cache):
    """slmforge's slot-addressed cache, in the Cache type generate() passes from step to step."""

    def __init__(self, inner):
        super().__init__(layers=[])
        self.inner = inner

    @property
    def is_compileable(self) -> bool:
        return False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.inner.next_positions(1).max())


class SlmforgeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SlmforgeConfig
    base_model_prefix = "model"
    _no_split_modules = []

    def __init__(self, config: SlmforgeConfig):
        super().__init__(config)
        cfg = model_config(config.slmforge)
        self.model = MultiScaleTransformer(cfg) if cfg.arch == "multiscale" else Transformer(cfg)
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from model.safetensors

    def _tables(self) -> None:
        """RoPE tables are derived, never stored: from_pretrained builds the model without computing them."""
        if not getattr(self, "_tables_ready", False):
            for module in self.model.modules():
                if isinstance(module, RotaryEmbedding):
                    module.reset_tables()
                    module.to(self.device)
            self._tables_ready = True

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        if generation_config.use_cache is not False and model_kwargs.get("cache") is None:
            self._tables()
            model_kwargs["cache"] = SlmforgeCache(self.model.new_cache(batch_size, max_cache_length))

    def forward(self, input_ids=None, attention_mask=None, cache=None, past_key_values=None, labels=None,
                use_cache=None, logits_to_keep=0, **kwargs):
        self._tables()
        cache = cache if cache is not None else past_key_values
        inner = cache.inner if isinstance(cache, SlmforgeCache) else None
        positions = None
        if attention_mask is not None and (inner is None or int(inner.next_positions(1).max()) == 0):
            # the prompt (left padding marked by the mask): positions count its real tokens, -1 on padding
            positions = torch.where(attention_mask.bool(), attention_mask.long().cumsum(-1) - 1, -1)
        logits, _ = self.model(input_ids, positions=positions, cache=inner)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                     ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
'''


def model_sources() -> dict[str, str]:
    """{file name: source} of slmforge's model code and config dataclasses, imports made relative."""
    files = {"slmforge_config.py": Path(slmforge.config.tree.__file__).read_text()}
    for path in sorted(MODEL_DIR.glob("*.py")):
        if path.name not in LEFT_OUT:
            files[f"slmforge_{path.stem}.py"] = path.read_text()
    out = {}
    for name, text in files.items():
        text = IMPORT.sub(lambda m: f"from .slmforge_{m[2] or 'config'} import", text)
        if re.search(r"^\s*(from|import) slmforge\b", text, re.MULTILINE):
            raise RuntimeError(f"{name}: an import of slmforge is left that the exported folder cannot satisfy")
        out[name] = text
    return out


def remote_code_files(model_section: dict) -> tuple[dict, dict[str, str]]:
    """(config.json, {file name: source}) of a remote-code export of a model with this `model` section."""
    config = {"architectures": ["SlmforgeForCausalLM"], "model_type": "slmforge",
              "auto_map": {"AutoConfig": "configuration_slmforge.SlmforgeConfig",
                           "AutoModelForCausalLM": "modeling_slmforge.SlmforgeForCausalLM"},
              "slmforge": model_section, "torch_dtype": "float32", "use_cache": True}
    files = {"configuration_slmforge.py": CONFIGURATION, "modeling_slmforge.py": MODELING, **model_sources()}
    return config, files

