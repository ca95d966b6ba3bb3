"""The benchmark settings: model shapes, LoRA config, batch shapes. Everything from configs, no download."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


@dataclass
class Setting:
    name: str
    description: str
    kind: str  # "llama" or "gpt2"
    size: dict
    targets: list[str]
    r: int = 16
    alpha: int = 16
    batch: tuple[int, int] = (8, 128)
    small_batch: tuple[int, int] = (1, 16)
    mixed_batches: tuple[tuple[int, int], ...] = ((8, 128), (32, 16))
    adapters: int = 8
    packing: bool = False  # times the packing case (bench.cases.packing): packed rows against padded examples
    dora: bool = False  # times the DoRA training step (bench.cases.dora_training_step)

    def build(self, dtype: torch.dtype, device: torch.device) -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        if self.kind == "llama":
            model = LlamaForCausalLM(LlamaConfig(**self.size, tie_word_embeddings=False))
        else:
            model = GPT2LMHeadModel(GPT2Config(**self.size))
        model.config.use_cache = False
        return model.to(device=device, dtype=dtype).eval()

    @property
    def vocab(self) -> int:
        return self.size["vocab_size"]


REFERENCE = Setting(
    "llama-reference",
    "Llama-shaped: hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 8000, untied; LoRA r=16, α=16 on all "
    "seven projections",
    "llama",
    dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, vocab_size=8000),
    LLAMA_TARGETS,
    packing=True,
    dora=True,
)
GPT2 = Setting(
    "gpt2-conv1d",
    "GPT-2-shaped (Conv1D): hidden 768, 2 layers, 12 heads, vocab 8000; LoRA r=16, α=16 on c_attn, c_proj, c_fc",
    "gpt2",
    dict(n_embd=768, n_layer=2, n_head=12, vocab_size=8000, n_positions=256),
    GPT2_TARGETS,
)
QUICK = Setting(
    "llama-quick",
    "tiny Llama for checking the suite runs: hidden 64, 2 layers, vocab 500",
    "llama",
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=500),
    LLAMA_TARGETS,
    r=4,
    alpha=4,
    batch=(2, 16),
    small_batch=(1, 8),
    mixed_batches=((4, 16),),
    adapters=4,
)
SETTINGS = {s.name: s for s in (REFERENCE, GPT2, QUICK)}


def lorakit_model(
    setting: Setting, base: nn.Module, adapters: int = 1, copy_base: bool = True, use_dora: bool = False
) -> nn.Module:
    import lorakit as lk

    model = copy.deepcopy(base) if copy_base else base
    config = lk.LoraConfig(
        r=setting.r, alpha=setting.alpha, target_modules=setting.targets, init=False, use_dora=use_dora
    )
    for i in range(adapters):
        lk.inject(model, config, adapter=f"a{i}" if i else "default")
    lk.set_adapter(model, "default")
    return model


def peft_model(
    setting: Setting, base: nn.Module, adapters: int = 1, copy_base: bool = True, use_dora: bool = False
) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=setting.r,
        lora_alpha=setting.alpha,
        target_modules=setting.targets,
        init_lora_weights=False,
        fan_in_fan_out=setting.kind == "gpt2",
        use_dora=use_dora,
    )
    model = get_peft_model(copy.deepcopy(base) if copy_base else base, config)
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", config)
    model.set_adapter("default")
    return model


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    """A CUDA device in bf16 where there is one, else the CPU in fp32 (the reference setting)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    """The training cases' optimizer, the same for both libraries: fused AdamW over the trainable parameters,
    what lorakit's trainer and transformers' Trainer (torch ≥ 2.8) both use."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)


def floor_model(base: nn.Module) -> nn.Module:
    """The floor: every weight frozen, so backward computes all activation gradients and no weight gradient."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
