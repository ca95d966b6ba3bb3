"""LoraLinear's fast paths (lorakit.engine.fused): the fused autograd node for training, and the inference path
that picks the cheaper association, (x Aᵀ) Bᵀ or x (W + s·B·A)ᵀ, by token count. Both are checked against the
plain formula; and the fast path steps aside for hooks, replaced forwards and substituted parameters."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit.engine.fused import LoraLinearFunction
from lorakit.engine.layers import LoraLinear

IN, OUT, R, SCALE = 6, 10, 3, 1.5


def lora_linear(kind: str = "linear", bias: bool = True, dtype: torch.dtype = torch.float64) -> LoraLinear:
    """A LoraLinear with one random, non-zero adapter (scale SCALE) over nn.Linear or GPT-2's Conv1D."""
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, bias=bias) if kind == "linear" else Conv1D(OUT, IN)
    model = nn.Sequential(base).to(dtype)
    lk.inject(model, lk.LoraConfig(r=R, alpha=SCALE * R, target_modules=["0"], init=False))
    return model[0].to(dtype)


def formula(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ + b + s (x Aᵀ) Bᵀ, written out."""
    W = layer.base.weight.T if layer.fan_in_fan_out else layer.base.weight  # (out, in)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    y = x @ W.T + SCALE * (x @ A.T) @ B.T
    return y if layer.base.bias is None else y + layer.base.bias


def count_addmm(monkeypatch) -> list:
    """Records calls of torch.addmm (the inference path forms W + s·B·A with it)."""
    calls = []
    real = torch.addmm

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", spy)
    return calls


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("separate_dropout_input", [False, True])
def test_fused_node_gradients_match_finite_differences(transposed, bias, separate_dropout_input):
    torch.manual_seed(0)
    x = torch.randn(2, 4, IN, dtype=torch.float64, requires_grad=True)
    x_lora = torch.randn(2, 4, IN, dtype=torch.float64, requires_grad=True) if separate_dropout_input else None
    W = torch.randn(*((IN, OUT) if transposed else (OUT, IN)), dtype=torch.float64, requires_grad=True)
    b = torch.randn(OUT, dtype=torch.float64, requires_grad=True) if bias else None
    A = torch.randn(R, IN, dtype=torch.float64, requires_grad=True)
    B = torch.randn(OUT, R, dtype=torch.float64, requires_grad=True)

    def fused(x, x_lora, W, b, A, B):
        return LoraLinearFunction.apply(x, x_lora, W, b, A, B, SCALE, transposed)

    assert torch.autograd.gradcheck(fused, (x, x_lora, W, b, A, B))


class MatmulCounter(TorchDispatchMode):
    """Counts the matrix products (mm, addmm, bmm, ...) that run while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__.rstrip("_") in ("mm", "addmm", "bmm", "baddbmm", "matmul")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("input_needs_grad, products", [(False, 3), (True, 5)])
def test_fused_node_computes_only_the_gradients_asked_for(input_needs_grad, products):
    """Frozen base: g·B, the two factor gradients and, only when the input needs one, g·W + (g·B)·A.
    No out × in weight gradient, ever."""
    layer = lora_linear()
    x = torch.randn(5, IN, dtype=torch.float64, requires_grad=input_needs_grad)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "LoraLinearFunctionBackward"
    with MatmulCounter() as counter:
        y.sum().backward()
    assert counter.count == products
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert layer.lora_A["default"].grad is not None and layer.lora_B["default"].grad is not None


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_training_forward_equals_the_formula(kind):
    layer = lora_linear(kind)
    x = torch.randn(2, 7, IN, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layer(x), formula(layer, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_inference_forms_the_full_weight_from_the_break_even_token_count_on(kind, monkeypatch):
    layer = lora_linear(kind)
    threshold = 2 * IN * OUT // (IN + OUT)
    assert layer.merge_from_tokens == threshold
    calls = count_addmm(monkeypatch)
    for tokens in (1, threshold - 1, threshold, 4 * threshold):
        x = torch.randn(tokens, IN, dtype=torch.float64)
        with torch.inference_mode():
            y = layer(x)
        torch.testing.assert_close(y, formula(layer, x), rtol=1e-12, atol=1e-12)
    weight_shape = layer.base.weight.shape
    formed = [shape for shape in calls if shape == weight_shape]
    assert len(formed) == 2  # threshold and 4 × threshold tokens; fewer keep the factored product


def test_inference_in_bfloat16_never_folds_the_update_into_the_weight(monkeypatch):
    """W + s·B·A in bf16 would round the small update to W's precision: the factored path is kept."""
    layer = lora_linear(dtype=torch.bfloat16)
    calls = count_addmm(monkeypatch)
    x = torch.randn(8 * layer.merge_from_tokens, IN, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert calls == []
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    expected = torch.nn.functional.linear(x, layer.base.weight, layer.base.bias)
    expected.addmm_(x @ A.T, B.T, alpha=SCALE)
    assert torch.equal(y, expected)


def test_inference_with_dropout_in_training_mode_keeps_the_factored_path(monkeypatch):
    """Dropout applies to the low-rank input only, so W + s·B·A cannot stand in for it."""
    layer = lora_linear()
    layer.dropout["default"] = 0.5
    layer.train()
    calls = count_addmm(monkeypatch)
    with torch.no_grad():
        layer(torch.randn(8 * layer.merge_from_tokens, IN, dtype=torch.float64))
    assert calls == []


def test_replaced_parameters_are_used_by_the_next_forward():
    """The fast path reads the live parameter tables: assigning a new Parameter, or loading a state dict with
    assign=True, takes effect at once."""
    layer = lora_linear()
    x = torch.randn(4, IN, dtype=torch.float64)
    layer.lora_B["default"] = nn.Parameter(torch.zeros(OUT, R, dtype=torch.float64))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)
    state = {k: torch.randn_like(v) for k, v in layer.state_dict().items()}
    layer.load_state_dict(state, assign=True)
    assert layer.base.weight is not None and torch.equal(layer.base.weight, state["base.weight"])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), formula(layer, x), rtol=1e-12, atol=1e-12)


def test_functional_call_substitutes_the_parameters():
    layer = lora_linear()
    x = torch.randn(4, IN, dtype=torch.float64)
    params = {name: torch.randn_like(p) for name, p in layer.named_parameters()}
    y = torch.func.functional_call(layer, params, (x,))
    W, b, A, B = params["base.weight"], params["base.bias"], params["lora_A.default"], params["lora_B.default"]
    torch.testing.assert_close(y, x @ W.T + b + SCALE * (x @ A.T) @ B.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_hooks_on_the_base_layer_run_and_take_effect(grad):
    layer = lora_linear()
    x = torch.randn(4, IN, dtype=torch.float64, requires_grad=grad)
    calls = []
    layer.base.register_forward_pre_hook(lambda module, args: (args[0] * 2,))  # changes the base's input
    layer.base.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    with torch.set_grad_enabled(grad):
        y = layer(x)
    W, b = layer.base.weight, layer.base.bias
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    torch.testing.assert_close(y, (2 * x) @ W.T + b + SCALE * (x @ A.T) @ B.T, rtol=1e-12, atol=1e-12)
    assert calls == [(4, OUT)]


def test_a_forward_replaced_on_the_base_instance_is_called():
    layer = lora_linear()
    original = layer.base.forward
    layer.base.forward = lambda x: original(x) + 1  # as accelerate's hooks do
    x = torch.randn(4, IN, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), formula(layer, x) + 1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("adapters", [1, 2], ids=["fused-path", "general-path"])
def test_factors_left_on_the_meta_device_are_refused_beside_real_inputs(adapters):
    layer = lora_linear()
    for name in ["default", "second"][:adapters]:
        if name not in layer.lora_A:
            layer.add_adapter(name, R, SCALE, 0.0, False)
        layer.lora_A[name] = nn.Parameter(layer.lora_A[name].to("meta"))  # as an offloader leaves them
    layer.active_adapters = ["default", "second"][:adapters]
    with pytest.raises(ValueError, match="LoRA factors on the meta device"):
        layer(torch.randn(4, IN, dtype=torch.float64))
    layer.to("meta")  # a model all on the meta device (shapes only) is fine
    assert layer(torch.randn(4, IN, dtype=torch.float64, device="meta")).shape == (4, OUT)


def test_a_copied_layer_sees_a_forward_replaced_on_its_own_base():
    import copy

    layer = copy.deepcopy(lora_linear())
    original = layer.base.forward
    layer.base.forward = lambda x: original(x) + 1
    x = torch.randn(4, IN, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), formula(layer, x) + 1, rtol=1e-12, atol=1e-12)
