"""The embedded default model: built offline by the project itself, cached, warm-started.

A byte-level BPE tokenizer and a small Qwen2 trained from scratch on the generated problems, then
a short supervised warm start (TRL's SFT trainer) on correctly formatted solutions, so that the
policy starts with partial format compliance and some accuracy: GRPO cannot learn from all-zero
rewards. Cached by its settings, so only the first `make train` pays for it (about a minute).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from pipeline.config import Config


def build_default_model(config: Config) -> Path:
    """Return the directory of the default model for `config`, building it if not cached."""
    from pipeline.data import SYSTEM_PROMPT
    from pipeline.synthetic import generate
    from pipeline.tiny_model import build_tiny_model
    from pipeline.warmstart import formatted_completion, sft_warm_start

    m, seed = config.model, config.run.seed
    settings = {"hidden": m.build_hidden_size, "layers": m.build_layers, "sft_steps": m.build_sft_steps,
                "split_digits": m.build_split_digits, "seed": seed, "version": 2}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    final = Path(config.run.root) / ".cache" / f"default-model-{key}"
    if (final / "config.json").exists():
        return final
    work = final.with_name(final.name + ".building")
    shutil.rmtree(work, ignore_errors=True)
    # Train data only (the test split is generated from a different seed): tokenizer corpus + SFT.
    examples = generate(4000, seed, "train")
    corpus = [SYSTEM_PROMPT] + [e.question + "\n" + formatted_completion(e) for e in examples]
    base = build_tiny_model(work / "base", corpus, vocab_size=1024, hidden_size=m.build_hidden_size,
                            intermediate_size=m.build_hidden_size * 3, num_layers=m.build_layers,
                            num_heads=m.build_hidden_size // 32, num_kv_heads=max(1, m.build_hidden_size // 64),
                            split_digits=m.build_split_digits, seed=seed)
    if m.build_sft_steps:
        sft_warm_start(base, examples, work / "sft", max_steps=m.build_sft_steps, seed=seed)
        shutil.rmtree(work / "sft" / "sft-work", ignore_errors=True)
        built = work / "sft"
    else:
        built = base
    built.rename(final)  # atomic: a half-built model is never taken from the cache
    shutil.rmtree(work, ignore_errors=True)
    (final / "build.json").write_text(json.dumps(settings, indent=2) + "\n")
    return final
