"""Helpers shared by the tests (`from helpers import ...`; tests/ is on pytest's pythonpath). Fixtures live in
conftest.py files.

- tiny transformers models built from configs (no download) and the words of their tokenizer;
- running `lorakit ...` in this process (`run_cli`, `cli_error`) and, for the few tests that need a fresh
  process, `python -m lorakit` (`run_module`, also under torchrun);
- small plain-torch models: `TinyNet` (every layer kind the engine wraps) and `Net` with `adapted_net`, the
  model of the adapter-file tests;
- adapters built by hand for the SVD tools (`adapter`, `random_factors`, ...) and planted weight changes of the
  tiny Llama for `extract` (`plant`, `PLANTED`, ...).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

import lorakit as lk
from lorakit.engine.peft_format import config_from_peft

# -- tiny transformers models ------------------------------------------------------------------------------

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

# The tiny Llama with widths that are multiples of 64, the weights per scale of bitsandbytes' 4-bit blocks: a block
# then never spans two rows (bitsandbytes' CPU kernel dequantizes such a block wrongly; lorakit's own does not).
QUANTIZABLE_LLAMA = {**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 128}


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


# A chat model: the tiny Llama with a word-level tokenizer that knows ChatML's turn markers, and its template.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_WORDS = [
    *("system", "user", "assistant", "you", "are", "helpful", "what", "colour", "sky", "grass", "snow", "blue"),
    *("green", "white", "say", "hello", "hi", "name", "my", "bot", "count", "one", "two", "three", "yes", "no"),
    *("how", "many", "legs", "has", "four", "six", "eight", "spider", "ant", "and", "thanks", "welcome", "ok"),
]


def build_chat_tokenizer(template: str | None = CHATML):
    """A word-level tokenizer with [PAD], [UNK], <|im_start|> and <|im_end|> (the end of a turn, also its eos),
    and the ChatML template (None: no template)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate([*specials, *dict.fromkeys(WORDS + CHAT_WORDS)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        eos_token="<|im_end|>",
        bos_token=None,
        chat_template=template,
    )


def save_tiny_chat_llama(path: Path, template: str | None = CHATML) -> Path:
    """The tiny Llama (random weights, seed 0) and the chat tokenizer, saved with save_pretrained: no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_chat_tokenizer(template)
    torch.manual_seed(0)
    config = LlamaConfig(
        **{**TINY_LLAMA, "vocab_size": len(tokenizer), "max_position_embeddings": 128},
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# -- the command line ----------------------------------------------------------------------------------------


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


PYTHON = sys.executable
# --standalone: a rendezvous on a free port, so that torchrun tests in parallel workers never share one
TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


def run_module(args: list[str], torchrun: int = 0, **kwargs) -> subprocess.CompletedProcess:
    """`python -m lorakit args` in a fresh process (under torchrun with `torchrun` processes)."""
    launcher = [*TORCHRUN, str(torchrun)] if torchrun else [PYTHON]
    return subprocess.run([*launcher, "-m", "lorakit", *args], capture_output=True, text=True, **kwargs)


def finetune_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """The arguments of `lorakit finetune` for a model directory, a data file and an output directory."""
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--no-progress", *extra]


# -- files -----------------------------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, bytes | None]:
    """Everything under `root`: each file's bytes, None for each directory, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def metrics_text(*records: dict) -> str:
    """The lines of a metrics.jsonl log holding `records`."""
    return "".join(json.dumps(r) + "\n" for r in records)


def adapters_equal(a: Path, b: Path, atol: float = 0.0) -> bool:
    """Whether two adapter directories hold the same tensors (bit for bit, or within `atol`)."""
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert set(x) == set(y)
    return all(torch.allclose(x[k], y[k], atol=atol, rtol=0) if atol else torch.equal(x[k], y[k]) for k in x)


# -- small plain-torch models ------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """Every layer kind lorakit wraps: Embedding, Linear, Conv1d."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 12)
        self.conv = nn.Conv1d(12, 12, kernel_size=3, padding=1)
        self.hidden = nn.Linear(12, 24)
        self.out = nn.Linear(24, 5)

    def forward(self, tokens):  # (batch, L) -> (batch, L, 5)
        h = self.embed(tokens)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.out(torch.relu(self.hidden(h)))


ALL = ["embed", "conv", "hidden", "out"]  # every layer of TinyNet


class Net(nn.Module):
    """Embedding -> Conv2d -> Linear -> Linear: every kind of layer an adapter file describes."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.hidden = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):  # (batch, 8) -> (batch, 8, 3)
        h = self.embed(tokens)  # (batch, 8, 8)
        h = self.conv(h.unsqueeze(1)).mean(1)  # (batch, 8, 8)
        return self.head(torch.relu(self.hidden(h)))


def build_net():
    """Net, the base model of the adapter-file tests: the same weights on every call."""
    torch.manual_seed(0)
    return Net()


NET_TOKENS = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(1))


def adapted_net(adapter="default", seed=1, **config):
    """Net with one non-zero adapter (r 2, α 4 on embed, conv and hidden unless `config` says otherwise)."""
    model = build_net()
    torch.manual_seed(seed)
    kwargs = {"r": 2, "alpha": 4, "target_modules": ["embed", "conv", "hidden"], "init": False}
    return lk.inject(model, lk.LoraConfig(**{**kwargs, **config}), adapter)


# -- stored adapters and planted weight changes, for the SVD tools -----------------------------------------------

PREFIX = "base_model.model."
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKENS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))

# planted rank per weight of the tiny Llama: (out × in) 32 × 32, 16 × 32, 32 × 64, 64 × 32
PLANTED = {
    "model.layers.0.self_attn.q_proj.weight": 2,
    "model.layers.0.self_attn.v_proj.weight": 3,
    "model.layers.1.mlp.down_proj.weight": 5,
    "model.layers.1.mlp.gate_proj.weight": 1,
}


def logits(model: nn.Module) -> torch.Tensor:
    """A causal LM's logits for TOKENS."""
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def base_state(build=build_tiny_llama) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in build().state_dict().items()}


def plant(base: dict[str, torch.Tensor], ranks: dict[str, int], seed: int = 0):
    """A "fine-tuned" state dict: W + B A of rank k added to each named weight; returns it and the deltas."""
    g = torch.Generator().manual_seed(seed)
    tuned, deltas = dict(base), {}
    for key, k in ranks.items():
        rows, cols = base[key].shape
        delta = (torch.randn(rows, k, generator=g, dtype=torch.float64) * 0.1) @ (
            torch.randn(k, cols, generator=g, dtype=torch.float64) * 0.1
        )
        tuned[key] = (base[key].double() + delta).to(base[key].dtype)
        deltas[key] = tuned[key].double() - base[key].double()  # what actually changed, after rounding
    return tuned, deltas


def tuned_model(tuned: dict[str, torch.Tensor], build=build_tiny_llama) -> nn.Module:
    model = build()
    model.load_state_dict(tuned, strict=False)
    return model


def layer_deltas(state: lk.AdapterState) -> dict[str, torch.Tensor]:
    """Each layer's ΔW = s·B·A (out × in) in float64, the scale resolved from the adapter's own config."""
    config = config_from_peft(state.config)
    out = {}
    for key, A in state.tensors.items():
        for a_suffix, b_suffix in (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B")):
            if key.endswith("." + a_suffix):
                path = key[len(PREFIX) : -len(a_suffix) - 1]
                B = state.tensors[key[: -len(a_suffix)] + b_suffix]
                r = A.shape[0]
                alpha = config.alpha_for(path)
                s = alpha / math.sqrt(r) if config.use_rslora else alpha / r
                out[path] = s * B.double() @ A.double()
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def assert_loads_with_logits(adapter_dir, build, expected, atol=1e-4) -> None:
    """The adapter, on a fresh base, gives `expected` in PEFT and in lorakit."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(build(), adapter_dir).eval()
    torch.testing.assert_close(logits(peft_model), expected, atol=atol, rtol=0)
    model = lk.load_adapter(build(), adapter_dir)
    torch.testing.assert_close(logits(model), expected, atol=atol, rtol=0)


def random_factors(out: int, inp: int, r: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B): A (r × inp), B (out × r), standard normal."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g, dtype=dtype), torch.randn(out, r, generator=g, dtype=dtype)


def adapter(factors: dict, alpha: float = 8.0, use_rslora: bool = False, alphas: dict | None = None) -> lk.AdapterState:
    """An AdapterState from {path: (A, B)}: rank from the factors, α from `alphas` or `alpha`."""
    ranks = {path: A.shape[0] for path, (A, _) in factors.items()}
    r = max(ranks.values())
    tensors = {}
    for path, (A, B) in factors.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = A
        tensors[f"{PREFIX}{path}.lora_B.weight"] = B
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(factors),
        "rank_pattern": {re.escape(path): k for path, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(path): a for path, a in (alphas or {}).items()},
        "use_rslora": use_rslora,
        "init_lora_weights": True,
    }
    return lk.AdapterState(config, tensors)


def full(A: torch.Tensor, B: torch.Tensor, alpha: float, use_rslora: bool = False) -> torch.Tensor:
    """s·B·A in float64, s = α/r (α/√r with rsLoRA)."""
    r = A.shape[0]
    s = alpha / math.sqrt(r) if use_rslora else alpha / r
    return s * B.double() @ A.double()


SMALL = {"a.q": (40, 30, 6), "a.v": (20, 50, 5), "b.o": (30, 30, 4)}  # path: (out, in, r)


def small_adapter(use_rslora: bool = False, dtype=torch.float32) -> tuple[lk.AdapterState, dict[str, torch.Tensor]]:
    """An adapter on the SMALL layers (α 12, 3 for a.v) and each layer's full ΔW."""
    factors = {path: random_factors(o, i, r, seed) for seed, (path, (o, i, r)) in enumerate(SMALL.items())}
    factors = {path: (A.to(dtype), B.to(dtype)) for path, (A, B) in factors.items()}
    alphas = {"a.v": 3.0}
    state = adapter(factors, alpha=12.0, use_rslora=use_rslora, alphas=alphas)
    deltas = {path: full(A, B, alphas.get(path, 12.0), use_rslora) for path, (A, B) in factors.items()}
    return state, deltas


def two_adapters(dtype=torch.float64, second_shapes=None):
    """a.q in both (ranks 3 and 5), a.v only in the first, b.o only in the second; different α and rsLoRA."""
    shapes = {"a.q": (40, 30, 5), "b.o": (30, 30, 2), **(second_shapes or {})}
    f1 = {"a.q": random_factors(40, 30, 3, 1, dtype), "a.v": random_factors(20, 50, 2, 2, dtype)}
    f2 = {path: random_factors(o, i, r, 10 + n, dtype) for n, (path, (o, i, r)) in enumerate(shapes.items())}
    one, two = adapter(f1, alpha=6.0), adapter(f2, alpha=4.0, use_rslora=True)
    d1 = {path: full(A, B, 6.0) for path, (A, B) in f1.items()}
    d2 = {path: full(A, B, 4.0, use_rslora=True) for path, (A, B) in f2.items()}
    return one, two, d1, d2


def weighted_sum(d1, d2, w1, w2) -> dict[str, torch.Tensor]:
    paths = list(dict.fromkeys([*d1, *d2]))
    return {p: w1 * d1.get(p, 0) + w2 * d2.get(p, 0) for p in paths}


def deficient_adapter() -> tuple[lk.AdapterState, dict[str, torch.Tensor]]:
    """Two layers of r = 4: one of full rank 4, one whose B repeats two columns (true rank 2)."""
    A1, B1 = random_factors(40, 30, 4, 1)
    A2, B2 = random_factors(20, 50, 4, 2)
    B2[:, 2:] = B2[:, :2]
    state = adapter({"full": (A1, B1), "deficient": (A2, B2)}, alpha=8.0)
    return state, {"full": full(A1, B1, 8.0), "deficient": full(A2, B2, 8.0)}


def saved_small(directory, name: str) -> str:
    """`small_adapter()` saved as `directory`/`name`; its path."""
    small_adapter()[0].save(directory / name)
    return str(directory / name)
