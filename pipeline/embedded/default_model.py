"""The embedded default model: built offline by the project itself, cached, warm-started.

A byte-level BPE tokenizer (digits split) and a small Qwen2 trained from scratch on the generated
problems by a supervised warm start (TRL's SFT trainer) on formatted solutions, a share of them
from a sloppy teacher who answers one step early (`model.build_early_answers`): the policy starts
right sometimes, and what it gets wrong is what GRPO's correctness reward can fix. Cached by its
settings, so only the first `make train` pays for it (about 2.5 minutes on 2 cores).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import time
from pathlib import Path

from pipeline.config import Config

SFT_BATCH = 32
TOKENIZER_CORPUS = 4000  # problems the BPE tokenizer is trained on


def tiny_shape(config: Config) -> dict:
    """The default model's shape in config.json's keys, from the model.build_* settings: what it is
    built with, and what the launch plan's memory arithmetic reads before it exists."""
    hidden = config.model.build_hidden_size
    return {
        "hidden_size": hidden,
        "intermediate_size": hidden * 3,
        "num_hidden_layers": config.model.build_layers,
        "num_attention_heads": hidden // 32,
        "num_key_value_heads": max(1, hidden // 64),
        "vocab_size": 1024,
        "tie_word_embeddings": True,
    }


def build_default_model(config: Config) -> Path:
    """Return the directory of the default model for `config`, building it if not cached. One build
    per model at a time (a lock beside it: a second process waits, then takes the first one's); a build
    that is interrupted or fails leaves nothing behind."""
    m, d, seed = config.model, config.data, config.run.seed
    settings = {
        "hidden": m.build_hidden_size,
        "layers": m.build_layers,
        "sft_steps": m.build_sft_steps,
        "split_digits": m.build_split_digits,
        "early_answers": m.build_early_answers,
        "levels": d.synthetic_levels,
        "seed": seed,
        "version": 5,
    }
    # settings added since version 5 join the key only when set, so models cached before keep theirs
    if m.build_tool_demos:
        settings["tool_demos"] = m.build_tool_demos
    if d.synthetic_max_operand != 10:
        settings["max_operand"] = d.synthetic_max_operand
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    final = Path(config.run.root) / ".cache" / f"default-model-{key}"
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(final):  # another process building the same model: wait for it, then take its model
        if (final / "config.json").exists():
            return final
        work = final.with_name(final.name + ".building")
        shutil.rmtree(work, ignore_errors=True)  # left by a build that was killed (we hold the lock)
        try:
            _build(config, settings, work, final)
        except BaseException:  # interrupted (Ctrl-C; SIGTERM, which the launcher raises as Ctrl-C) or failed
            shutil.rmtree(work, ignore_errors=True)
            raise
    return final


@contextlib.contextmanager
def build_lock(final: Path):
    """An exclusive lock on `final`'s lock file (beside it, never removed), held while it is built."""
    with open(final.with_name(final.name + ".lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another process is building {final.name}; waiting for it", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(config: Config, settings: dict, work: Path, final: Path) -> None:
    """Build the default model in `work`, then move it to `final` in one rename."""
    from pipeline.embedded.tiny_model import build_tiny_model
    from pipeline.embedded.warmstart import (
        calculator_calls,
        formatted_completion,
        sft_warm_start,
        sloppy_completions,
    )
    from pipeline.task.data import PromptStyle
    from pipeline.task.synthetic import generate
    from pipeline.task.tools import CALL_CLOSE, CALL_OPEN, load_toolbox
    from pipeline.task.xml_format import SYSTEM_PROMPT

    m, d, seed = config.model, config.data, config.run.seed
    # Train-split problems only (the test split is disjoint): tokenizer corpus + SFT, about one epoch.
    examples = generate(
        SFT_BATCH * max(m.build_sft_steps, 1), seed, "train", d.synthetic_levels, d.synthetic_max_operand
    )
    # The tokenizer's corpus does not depend on the SFT length, so a longer warm start (the SFT control)
    # starts from the very same tokenizer and initial weights. With tool demos it holds the calls too,
    # so their JSON is a few merged tokens, not dozens of bytes.
    corpus = [SYSTEM_PROMPT] + [
        e.question
        + "\n"
        + formatted_completion(e)
        + "".join(call for call, _ in calculator_calls(e) if m.build_tool_demos)
        for e in generate(TOKENIZER_CORPUS, seed, "train", d.synthetic_levels, d.synthetic_max_operand)
    ]
    completions = sloppy_completions(examples, m.build_early_answers, seed)  # see model.build_early_answers
    shape = tiny_shape(config)
    base = build_tiny_model(
        work / "base",
        corpus,
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_layers=shape["num_hidden_layers"],
        num_heads=shape["num_attention_heads"],
        num_kv_heads=shape["num_key_value_heads"],
        split_digits=m.build_split_digits,
        seed=seed,
        extra_tokens=(CALL_OPEN, CALL_CLOSE) if m.build_tool_demos else (),
    )
    started = time.time()
    if m.build_sft_steps:
        sft_warm_start(
            base,
            examples,
            work / "sft",
            max_steps=m.build_sft_steps,
            batch_size=SFT_BATCH,
            seed=seed,
            completions=completions,
            calculator_share=m.build_tool_demos,
            style=PromptStyle(tools=tuple(load_toolbox(["calculator"], None).schemas)),
        )
        shutil.rmtree(work / "sft" / "sft-work", ignore_errors=True)
        built = work / "sft"
    else:
        built = base
    # the warm start's time, so an SFT-for-the-same-time control (launch/sft_control.py) can size itself
    (built / "build.json").write_text(
        json.dumps({**settings, "sft_seconds": round(time.time() - started, 1)}, indent=2) + "\n"
    )
    built.rename(final)  # atomic: a half-built model is never taken from the cache
    shutil.rmtree(work, ignore_errors=True)
