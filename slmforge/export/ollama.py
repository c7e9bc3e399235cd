"""`slmforge export RUN --to ollama DIR`: the GGUF file and a Modelfile that `ollama create` imports.

Ollama's TEMPLATE is a Go template, not the Jinja chat template transformers reads, so it is not
translated: a ChatML chat template (`<|im_start|>role ... <|im_end|>`, which slmforge's tokenizers reserve)
becomes Ollama's ChatML template; any other model gets the plain completion template `{{ .Prompt }}`.
"""

from __future__ import annotations

from pathlib import Path

from slmforge.export.folder import refuse_existing, write_folder
from slmforge.export.gguf_export import export_gguf
from slmforge.infer.load import load_model

CHATML = '''{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
'''


def modelfile(tokenizer, context: int) -> str:
    """The Modelfile beside model.gguf: its template, stop strings and context length."""
    chatml = bool(tokenizer.chat_template) and "<|im_start|>" in tokenizer.chat_template
    template, stops = (CHATML, ["<|im_end|>"]) if chatml else ("{{ .Prompt }}", [])
    eos = tokenizer.hf.id_to_token(tokenizer.eos_id)
    lines = ["FROM ./model.gguf", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{stop}"' for stop in dict.fromkeys([*stops, eos]) if stop]
    lines.append(f"PARAMETER num_ctx {context}")
    return "\n".join(lines) + "\n"


def export_ollama(run: str | Path, out: str | Path, dtype: str = "f32", force: bool = False) -> Path:
    """Write the folder `out` (model.gguf and Modelfile), whole or not at all; returns `out`."""
    out = Path(out)
    refuse_existing(out, force)
    loaded = load_model(run, device="cpu")

    def fill(folder: Path) -> None:
        export_gguf(loaded.checkpoint, folder / "model.gguf", dtype=dtype)
        (folder / "Modelfile").write_text(modelfile(loaded.tokenizer, loaded.config.model.max_seq_len))

    return write_folder(out, fill)
