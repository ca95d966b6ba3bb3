"""Shared fixtures: a tiny transformers Llama with its own word-level tokenizer, and data files for it.
Helper functions are in helpers.py."""

import os
import random
from pathlib import Path

import pytest
import torch
from helpers import QUANTIZABLE_LLAMA, SENTENCES, TINY_LLAMA, WORDS, save_tiny_chat_llama, write_jsonl
from hypothesis import settings

# The same generated examples on every run: a failure is reproducible, and CI cannot pass on a lucky draw.
settings.register_profile("lorakit", derandomize=True)
settings.load_profile("lorakit")

# Under pytest-xdist each worker gets its share of the cores for torch's threads: two workers with a thread per
# core each spin against each other (a test of 1.5 s alone took 20 s so).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32) and a word-level tokenizer, saved with save_pretrained: no download."""
    return save_word_llama(tmp_path_factory.mktemp("tiny-llama"), TINY_LLAMA)


@pytest.fixture(scope="session")
def quantizable_llama(tmp_path_factory) -> Path:
    """The tiny Llama at hidden 64 (QUANTIZABLE_LLAMA: bitsandbytes' 4-bit blocks fit its rows) and its tokenizer."""
    return save_word_llama(tmp_path_factory.mktemp("quantizable-llama"), QUANTIZABLE_LLAMA)


def save_word_llama(path: Path, sizes: dict) -> Path:
    """A Llama of `sizes` (random weights, seed 0) and a word-level tokenizer of WORDS, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    torch.manual_seed(0)
    config = LlamaConfig(**{**sizes, "vocab_size": len(vocab), "max_position_embeddings": 64})
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def word_data(tmp_path_factory) -> Path:
    """64 lines, JSONL: four short sentences in random order, something the tiny model can learn."""
    rng = random.Random(0)
    rows = [{"text": rng.choice(SENTENCES)} for _ in range(64)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory) -> Path:
    """The tiny Llama with a ChatML template and a tokenizer whose turns end with <|im_end|> (its eos)."""
    return save_tiny_chat_llama(tmp_path_factory.mktemp("tiny-chat-llama"))
