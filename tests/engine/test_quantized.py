"""LoRA on bitsandbytes' 4-bit and 8-bit bases (lorakit.engine.quantized) against the real PEFT and bitsandbytes.

The bases load through transformers' BitsAndBytesConfig, as a PEFT user loads them: NF4 with double quantization
in float32, and LLM.int8(). PEFT computes through bitsandbytes' own layers, whose outputs lorakit's match where
they dequantize and multiply in float32, as lorakit always does: in train mode (no dropout anywhere, so the
outputs are those of eval mode), and, for 4 bits, in eval mode too once bitsandbytes' AVX512-BF16 path is off
(on such CPUs it repacks the weight in place and computes in bfloat16); in eval mode its 8-bit layer quantizes
its input to int8 as well (LLM.int8()).
"""

import copy

import pytest
import torch
from helpers import QUANTIZABLE_LLAMA, TOKENS, logits
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

import lorakit as lk
from lorakit.engine import model as engine_model
from lorakit.engine import quantized
from lorakit.engine.quantized import DequantizedLinear, QuantizedLoraLinear, dequantized_weight, scratch
from lorakit.training.quantize import import_bitsandbytes, quantize_linears

bnb = import_bitsandbytes()
ATOL = 1e-5
LORA = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
PEFT_LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
BITS = [4, 8]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("quantizable-base")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**QUANTIZABLE_LLAMA)).save_pretrained(path)
    return path


def bnb_config(bits):
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def quantized_base(path, bits):
    """The base as transformers' BitsAndBytesConfig loads it, in train mode (see the module's docstring)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(bits), device_map="cpu")
    model.config.use_cache = False
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model.train()


def adapted(path, bits, **config):
    torch.manual_seed(1)
    return lk.inject(quantized_base(path, bits), lk.LoraConfig(**{**LORA, "init": False, **config}))


def randomize(params):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# -- the quantized base ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_quantize_linears_makes_the_layers_transformers_loads(base_dir, bits):
    from transformers import AutoModelForCausalLM

    ours = quantize_linears(AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype="auto"), bits).state_dict()
    theirs = quantized_base(base_dir, bits).state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


@pytest.mark.parametrize("bits", BITS)
def test_dequantized_weight_is_bitsandbytes_own(base_dir, bits):
    layer = quantized_base(base_dir, bits).model.layers[0].mlp.down_proj
    if bits == 4:
        expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    else:
        expected = bnb.functional.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
    assert torch.equal(dequantized_weight(layer, torch.float32), expected)


@pytest.mark.parametrize("shape", [(16, 96), (100, 70), (7, 9)])
def test_4bit_blocks_across_rows_dequantize_to_the_weight(shape):
    """Blocks of 64 values that span two rows, and a last partial block: lorakit reads them as bitsandbytes wrote
    them (bitsandbytes' CPU kernel reads such a weight per row and gets other values)."""
    torch.manual_seed(0)
    weight = torch.randn(shape)
    layer = bnb.nn.Linear4bit(shape[1], shape[0], compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=False, quant_type="nf4", module=layer
    ).to("cpu")
    error = dequantized_weight(layer, torch.float32) - weight
    # NF4's widest step between neighbouring values is 0.304 of a block's largest magnitude (exact scales: no
    # double quantization)
    for block, values in zip(error.view(-1).split(64), weight.view(-1).split(64), strict=True):
        assert block.abs().max() <= 0.153 * values.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_kernel_and_the_torch_path_dequantize_alike(monkeypatch, dtype, quant_type):
    """Rows of whole blocks go through bitsandbytes' C kernel into the buffer; any other weight through torch."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(192, 40, compute_dtype=dtype, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(
        torch.randn(40, 192), requires_grad=False, compress_statistics=True, quant_type=quant_type, module=layer
    ).to("cpu")
    assert quantized.native_4bit_kernel(layer.weight.quant_state, torch.empty(40, 192, dtype=dtype)) is not None
    native = dequantized_weight(layer, dtype, out=torch.full((40, 192), float("nan"), dtype=dtype))
    monkeypatch.setattr(quantized, "native_4bit_kernel", lambda state, out: None)
    assert torch.equal(native, dequantized_weight(layer, dtype))


# -- one layer -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_base_product_and_its_gradients_are_those_of_the_dequantized_weight(base_dir, bits):
    layer = quantized_base(base_dir, bits).model.layers[0].mlp.up_proj
    W = dequantized_weight(layer, torch.float32)
    bias = torch.randn(W.shape[0], requires_grad=True)
    x = torch.randn(3, 5, W.shape[1], requires_grad=True)
    y = DequantizedLinear.apply(x, bias, layer, None)
    g = torch.randn_like(y)
    y.backward(g)
    x2, bias2 = x.detach().requires_grad_(), bias.detach().requires_grad_()
    y2 = nn.functional.linear(x2, W, bias2)
    y2.backward(g)
    torch.testing.assert_close(y, y2, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(x.grad, x2.grad, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(bias.grad, bias2.grad, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("bits", BITS)
def test_training_keeps_no_dequantized_weight_for_backward(base_dir, bits):
    """What autograd saves for the backward pass of a whole step: activations and factors, never a tensor the
    size of a weight (the scratch buffer they are dequantized into is not saved either)."""
    model = adapted(base_dir, bits)
    weights = {
        tuple(layer.base.weight.quant_state.shape) if bits == 4 else tuple(layer.base.weight.shape)
        for _, layer in engine_model.lora_layers(model)
    }
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(input_ids=TOKENS, labels=TOKENS).loss
    assert saved and not [t for t in saved if tuple(t.shape) in weights]
    buffer = scratch((1, 1), torch.float32, torch.device("cpu"))
    assert not [t for t in saved if t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()]
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in engine_model.adapter_parameters(model).values())


def test_adapter_factors_take_the_4bit_compute_dtype(base_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, dtype=torch.bfloat16)
    lk.inject(model, lk.LoraConfig(**LORA))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantizedLoraLinear)
    assert {p.dtype for p in engine_model.adapter_parameters(model).values()} == {torch.bfloat16}
    assert model(input_ids=TOKENS).logits.dtype == torch.bfloat16


# -- against PEFT, both ways -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_lorakit_adapter_on_a_quantized_base_loads_in_peft_with_identical_outputs(base_dir, bits, tmp_path):
    model = adapted(base_dir, bits)
    expected = logits(model)
    lk.save_adapter(model, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(quantized_base(base_dir, bits), tmp_path / "adapter").train()
    assert any(type(m).__module__ == "peft.tuners.lora.bnb" for m in theirs.modules())  # PEFT's own bnb layers
    torch.testing.assert_close(logits(theirs), expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("bits", BITS)
def test_peft_adapter_on_a_quantized_base_loads_in_lorakit_with_identical_outputs(base_dir, bits, tmp_path):
    theirs = get_peft_model(quantized_base(base_dir, bits), PeftLoraConfig(**PEFT_LORA))
    randomize(p for p in theirs.parameters() if p.requires_grad)
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    model = lk.load_adapter(quantized_base(base_dir, bits), tmp_path / "adapter")
    assert all(isinstance(layer, QuantizedLoraLinear) for _, layer in engine_model.lora_layers(model))
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=ATOL)
    with theirs.disable_adapter():
        expected_off = logits(theirs)
    with lk.disabled(model):
        torch.testing.assert_close(logits(model), expected_off, atol=ATOL, rtol=ATOL)


def test_mixed_batches_on_a_4bit_base_match_peft(base_dir):
    model = adapted(base_dir, 4)
    lk.inject(model, lk.LoraConfig(**{**LORA, "init": False, "target_modules": ["q_proj", "v_proj"]}), "b")
    theirs = get_peft_model(quantized_base(base_dir, 4), PeftLoraConfig(**PEFT_LORA))
    theirs.add_adapter("b", PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name in ("default", "b"):
            for key, p in engine_model.adapter_parameters(model, name).items():
                params[key.replace(".weight", f".{name}.weight")].copy_(p)
    theirs.eval()  # PEFT takes adapter_names in eval mode only
    order, inputs = ["b", "__base__", "default", "b"], {"input_ids": TOKENS.repeat(2, 1)}
    with torch.no_grad():
        expected = theirs(**inputs, adapter_names=order).logits
        got = lk.forward_per_sample(model, order, **inputs).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=ATOL)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward(base_dir):
    def adapter_grads(checkpointing):
        model = adapted(base_dir, 4)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        return {key: p.grad for key, p in engine_model.adapter_parameters(model).items()}

    plain, checkpointed = adapter_grads(False), adapter_grads(True)
    for key, grad in plain.items():
        torch.testing.assert_close(checkpointed[key], grad, atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("bits", BITS)
def test_parameter_counts_equal_peft_s_on_a_quantized_base(base_dir, bits):
    ours = lk.parameter_counts(lk.inject(quantized_base(base_dir, bits), lk.LoraConfig(**LORA)))
    theirs = get_peft_model(quantized_base(base_dir, bits), PeftLoraConfig(**PEFT_LORA))
    assert ours == theirs.get_nb_trainable_parameters()


# -- merging -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_merge_rounds_with_a_warning_and_unmerge_restores_the_base_exactly(base_dir, bits):
    model = adapted(base_dir, bits)
    before = {path: layer.base.weight for path, layer in engine_model.lora_layers(model)}
    unmerged = logits(model)
    with pytest.warns(UserWarning, match=f"rounds W \\+ s·B·A to {bits} bits"):
        lk.merge(model)
    merged = logits(model)
    assert not torch.equal(merged, unmerged)
    torch.testing.assert_close(merged, unmerged, atol=0.5, rtol=0)  # rounded, not lost
    lk.unmerge(model)
    assert all(layer.base.weight is before[path] for path, layer in engine_model.lora_layers(model))
    assert torch.equal(logits(model), unmerged)


@pytest.mark.parametrize("bits", BITS)
def test_merge_and_unload_dequantized_is_full_precision_and_keeps_the_outputs(base_dir, bits):
    model = adapted(base_dir, bits, target_modules=["q_proj", "gate_proj"])  # other layers stay quantized
    unmerged = logits(model)
    plain = lk.merge_and_unload(copy.deepcopy(model), dequantize=True)
    assert not [m for m in plain.modules() if isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)]
    assert {m.weight.dtype for m in plain.modules() if isinstance(m, nn.Linear)} == {torch.float32}
    torch.testing.assert_close(logits(plain), unmerged, atol=ATOL, rtol=ATOL)
    with pytest.warns(UserWarning, match="rounds"):
        kept = lk.merge_and_unload(model)  # without dequantize: bitsandbytes layers holding the rounded merge
    assert isinstance(kept.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)


def test_merge_and_unload_dequantized_after_a_merge_starts_from_the_weight_before_it(base_dir):
    model = adapted(base_dir, 4)
    unmerged = logits(model)
    with pytest.warns(UserWarning):
        lk.merge(model)
    plain = lk.merge_and_unload(model, dequantize=True)
    torch.testing.assert_close(logits(plain), unmerged, atol=ATOL, rtol=ATOL)


# -- refusals ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [({"init": "pissa"}, "quantized"), ({"use_dora": True}, "DoRA")],
    ids=["pissa", "dora"],
)
def test_what_needs_the_weight_itself_is_refused_on_a_quantized_layer(base_dir, config, message):
    model = quantized_base(base_dir, 4)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        lk.inject(model, lk.LoraConfig(**{**LORA, **config}))
    assert not list(engine_model.lora_layers(model))
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())


def test_a_4bit_layer_repacked_by_bitsandbytes_for_cpu_inference_is_refused(base_dir):
    model = quantized_base(base_dir, 4)
    model.model.layers[0].self_attn.q_proj.weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="repacked its weight"):
        lk.inject(model, lk.LoraConfig(**LORA))
