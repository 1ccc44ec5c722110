"""Shared fixtures: the real GSM8K files from ../shared and a tiny locally built model."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GSM8K_DIR = Path(os.environ.get("GSM8K_DIR", REPO.parent / "shared" / "data" / "gsm8k"))


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "train.jsonl").exists():
        pytest.fail(f"GSM8K files not found in {GSM8K_DIR} (set GSM8K_DIR or put ../shared beside the repo)")
    return GSM8K_DIR


def tiny_corpus(gsm8k_dir: Path, rows: int = 2000) -> list[str]:
    from pipeline.data import SYSTEM_PROMPT, read_jsonl

    examples = read_jsonl(gsm8k_dir / "train.jsonl")[:rows]
    return [SYSTEM_PROMPT] + [e.question + "\n" + e.solution for e in examples]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, gsm8k_dir) -> Path:
    """A ~0.2M-parameter Qwen2 with tied embeddings (the common case for small models)."""
    from pipeline.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-tied"), tiny_corpus(gsm8k_dir), tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
