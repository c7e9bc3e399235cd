"""The card's "how to use" section: slmforge itself, transformers (a native class or remote code) and
llama.cpp / Ollama, each claimed only where slmforge's exporters take the model (`slmforge info RUN
--targets`, with the trained routing biases considered as the exporters consider them)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from slmforge.card.run import RunFacts


@dataclass
class Targets:
    native: str | None  # the transformers class, when one computes the model exactly
    native_reasons: list[str]
    gguf_arch: str | None  # llama.cpp's architecture, when it computes the model exactly
    gguf_reasons: list[str]


def export_targets(facts: RunFacts) -> Targets:
    from slmforge.export.gguf_export import gguf_arch, gguf_blockers
    from slmforge.export.hf import ARCHITECTURES, native_family

    m = facts.config.model
    family, native_reasons = native_family(m, facts.routing_biases or None)
    gguf_reasons = gguf_blockers(m, facts.routing_biases or None)
    return Targets(ARCHITECTURES[family] if family else None, native_reasons,
                   None if gguf_reasons else gguf_arch(m), gguf_reasons)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def file_name(name: str) -> str:
    """The card's title as a file name for the commands it shows: quickstart, my-model."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def usage_section(facts: RunFacts, targets: Targets, prompt: str, title: str) -> list[str]:
    run, name = str(facts.folder), file_name(title)
    out = ["With slmforge (the `serve` extra adds the server):", "", "```bash",
           f"slmforge sample {run} --prompt {_quote(prompt)} --max-new-tokens 64 --temperature 0.8 --top-p 0.95",
           f"slmforge serve {run}   # OpenAI-compatible API at http://127.0.0.1:8000/v1 and a chat page",
           "```", ""]
    remote = "" if targets.native else ", trust_remote_code=True"
    if targets.native:
        out.append(f"With transformers: `slmforge export` writes a folder that transformers' own "
                   f"`{targets.native}` loads (no remote code):")
    else:
        out.append("With transformers: no native class computes this model ("
                   + "; ".join(targets.native_reasons) + "), so the exported folder carries slmforge's model code "
                   "and loads with `trust_remote_code=True` (it needs only torch and transformers):")
    out += ["", "```bash", f"slmforge export {run} --to hf {name}-hf", "```", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained("{name}-hf")',
            f'model = AutoModelForCausalLM.from_pretrained("{name}-hf"{remote})',
            f"ids = tokenizer({_quote(prompt)}, return_tensors=\"pt\").input_ids",
            "print(tokenizer.decode(model.generate(ids, max_new_tokens=64, do_sample=False)[0]))",
            "```", ""]
    if targets.gguf_arch:
        out += [f"With llama.cpp or Ollama: it exports as llama.cpp's `{targets.gguf_arch}` architecture:", "",
                "```bash", f"slmforge export {run} --to gguf {name}.gguf --dtype f16",
                f"llama-cli -m {name}.gguf -p {_quote(prompt)} -n 64",
                f"slmforge export {run} --to ollama {name}-ollama   # model.gguf and a Modelfile",
                f"ollama create {name} -f {name}-ollama/Modelfile && ollama run {name}", "```"]
    else:
        out.append("llama.cpp and Ollama: not available, llama.cpp would compute another model ("
                   + "; ".join(targets.gguf_reasons) + ").")
    return out
