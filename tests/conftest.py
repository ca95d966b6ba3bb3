"""Shared fixtures: a tiny transformers Llama with its own word-level tokenizer, and data files for it."""

import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# The same generated examples on every run: a failure is reproducible, and CI cannot pass on a lucky draw.
settings.register_profile("lorakit", derandomize=True)
settings.load_profile("lorakit")

WORDS = [
    *("the", "a", "cat", "dog", "sat", "on", "mat", "ran", "to", "park", "sun", "is", "hot", "cold"),
    *("rain", "falls", "day", "night", "good", "bad", "movie", "film", "great"),
]
SENTENCES = ["the cat sat on the mat", "a dog ran to the park", "the sun is hot", "rain falls day and night"]


# A tiny Llama: 2 layers, hidden 32, grouped-query attention (4 heads, 2 key-value heads).
TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
)


def build_tiny_llama():
    """The tiny Llama with the same weights on every call, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()


def build_tiny_gpt2():
    """A tiny GPT-2 (transformers Conv1D layers), the same weights on every call, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32)).eval()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Runs `lorakit argv` in this process: (exit code, stdout, stderr) of that call alone."""
    from lorakit.cli import main

    capsys.readouterr()  # drop whatever the setup printed (progress bars)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli_error(argv: list[str], capsys) -> str:
    """Runs `lorakit argv` in this process and checks the contract for bad input: exit code 2, no traceback,
    and a last stderr line "lorakit: error: ...". Returns stderr."""
    from lorakit.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    _, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("lorakit: error:"), err
    return err


def tree(root: Path) -> dict[str, bytes | None]:
    """Everything under `root`: each file's bytes, None for each directory, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32) and a word-level tokenizer, saved with save_pretrained: no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_LLAMA, "vocab_size": len(vocab), "max_position_embeddings": 64})
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def word_data(tmp_path_factory) -> Path:
    """64 lines, JSONL: four short sentences in random order, something the tiny model can learn."""
    rng = random.Random(0)
    rows = [{"text": rng.choice(SENTENCES)} for _ in range(64)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)
