"""A tiny random causal LM with a real tokenizer and chat template, built offline in ~1 s.

Tests point ``model.name`` at the folder this writes, so they go through exactly the
loading path real models use. The tokenizer is a byte-level BPE trained on a few
sentences; the model is a 2-layer Llama with random weights.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "hello there, how are you today? I am fine, thanks for asking.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "What is the weather like? It is sunny and warm with a light breeze.",
    "Tell me a joke about cats and computers and coffee in the morning.",
    "yes no maybe ok sure great thanks bye good bad short long answer",
]


def build_tiny_model(folder: Path, seed: int = 0, vocab_size: int = 320) -> Path:
    """Write a tiny model + tokenizer to ``folder`` (idempotent) and return it."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    import torch

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id,
                         bos_token_id=fast.bos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


def build_endless_model(folder: Path, base: Path, extra_tokens: list[str] = ()) -> Path:
    """The tiny model with its end-of-turn token outside the model's output vocabulary, so
    every reply runs to ``max_new_tokens`` (about 1.3 characters a token): streaming tests need
    replies that take a while to write, every time. ``extra_tokens`` are added to its vocabulary."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if extra_tokens:
        tok.add_tokens(list(extra_tokens))
    tok.add_special_tokens({"additional_special_tokens": ["<|never|>"]})
    tok.eos_token = "<|never|>"
    assert tok.convert_tokens_to_ids("<|never|>") == len(tok) - 1
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok) - 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=len(tok) - 1,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder
