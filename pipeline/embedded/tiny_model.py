"""Build a small Qwen2 model and its tokenizer locally, with no download.

Used by the tests and by the embedded CPU default. The tokenizer is a byte-level BPE trained with
`tokenizers` on the given text (so any string round-trips), with a ChatML template like Qwen's and
the four XML tags as single tokens. The model is a randomly initialised `Qwen2ForCausalLM`, saved in
HF format so both `AutoModelForCausalLM` and vLLM load it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pipeline.task.xml_format import TAGS

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = 1024,
    split_digits: bool = False,
    extra_tokens: tuple[str, ...] = (),
):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `corpus`. `split_digits`: every digit is
    its own token (as Qwen2 and Llama 3 do), so arithmetic and copying numbers work digit by digit
    instead of over arbitrary multi-digit merges. `extra_tokens`: more strings that are one token each
    (the tool-call tags, as tool-calling tokenizers have them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_tokens(list(TAGS) + list(extra_tokens))
    return tokenizer


def build_tiny_model(
    out_dir: str | Path,
    corpus: Iterable[str],
    *,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    max_positions: int = 1024,
    tie_word_embeddings: bool = True,
    split_digits: bool = False,
    extra_tokens: tuple[str, ...] = (),
    seed: int = 0,
) -> Path:
    """Save a random Qwen2 + trained tokenizer to `out_dir` and return it.

    vLLM's CPU attention needs a head size of at least 32 (hidden_size / num_heads).
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(corpus, vocab_size, split_digits, extra_tokens)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
