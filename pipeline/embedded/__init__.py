"""The embedded default model: a tiny Qwen2 and tokenizer built offline, warm-started with TRL's SFT."""
