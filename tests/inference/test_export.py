"""Exporting a merged model (lorakit.inference.export): the directory `merge_to_directory` writes loads with
transformers alone and gives the outputs of base + adapter, carries the tokenizer, chat template and generation
config, and every refusal or failure leaves no output behind."""

import json
import os

import pytest
import torch
from helpers import CHATML, TINY_LLAMA, build_chat_tokenizer, tree
from safetensors.torch import load_file

import lorakit as lk
from lorakit.engine.model import adapter_parameters
from lorakit.inference.export import merge_to_directory

TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]
MESSAGES = [{"role": "user", "content": "what colour is the sky"}, {"role": "assistant", "content": "blue"}]


def randomize(params, seed=7):
    """Make an adapter non-zero (B starts at zero), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def chat_tokens(model_dir):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(MESSAGES, tokenize=True, return_dict=False)
    return torch.tensor([ids])


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def adapted(model_dir, targets=TARGETS, auto_class=None, **config):
    """The base model in `model_dir` with a non-zero adapter (lorakit, unmerged)."""
    from transformers import AutoModelForCausalLM

    base = (auto_class or AutoModelForCausalLM).from_pretrained(model_dir, **config.pop("load", {}))
    model = lk.inject(base.eval(), lk.LoraConfig(r=4, alpha=8, target_modules=targets, **config))
    randomize(adapter_parameters(model).values())
    return model


def saved_adapter(model_dir, directory, targets=TARGETS):
    """A non-zero adapter on the model in `model_dir`, saved in `directory`; its path."""
    return lk.save_adapter(adapted(model_dir, targets), directory, base_model_name_or_path=str(model_dir))


@pytest.fixture(scope="module")
def merged(tiny_chat_llama, tmp_path_factory):
    """(adapter directory, merged directory, the adapted model's logits on a chat) for the tiny chat Llama."""
    root = tmp_path_factory.mktemp("merged")
    model = adapted(tiny_chat_llama)
    adapter = lk.save_adapter(model, root / "adapter", base_model_name_or_path=str(tiny_chat_llama))
    expected = logits(model, chat_tokens(tiny_chat_llama))
    out = merge_to_directory(tiny_chat_llama, adapter, root / "merged")
    return adapter, out, expected


def test_the_merged_directory_loads_with_automodel_and_gives_the_logits_of_base_plus_adapter(tiny_chat_llama, merged):
    from transformers import AutoModelForCausalLM

    _, out, expected = merged
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(model, chat_tokens(out)), expected, atol=1e-4, rtol=0)
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_llama).eval()
    assert not torch.allclose(logits(base, chat_tokens(out)), expected, atol=1e-2)  # the adapter did change it


def test_the_merged_directory_carries_the_tokenizer_chat_template_and_generation_config(tiny_chat_llama, merged):
    from transformers import AutoTokenizer, GenerationConfig

    _, out, _ = merged
    names = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json"} <= names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl"))]  # no pickle anywhere
    # readable by whoever may read the config (safetensors alone writes its files for their owner only)
    assert (out / "model.safetensors").stat().st_mode == (out / "config.json").stat().st_mode
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHATML
    assert tokenizer.apply_chat_template(MESSAGES) == AutoTokenizer.from_pretrained(
        tiny_chat_llama
    ).apply_chat_template(MESSAGES)
    assert (
        GenerationConfig.from_pretrained(out).eos_token_id
        == tokenizer.eos_token_id
        == tokenizer.convert_tokens_to_ids("<|im_end|>")
    )
    config = json.loads((out / "config.json").read_text())
    assert config["use_cache"] is True  # loading for training turns the cache off; a served model wants it
    assert config["dtype"] == "float32"  # the base's own


def test_peft_loads_the_adapter_on_the_base_with_the_merged_models_logits(tiny_chat_llama, merged):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter, out, _ = merged
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_llama), adapter).eval()
    merged_model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = chat_tokens(out)
    torch.testing.assert_close(logits(merged_model, tokens), logits(peft_model, tokens), atol=1e-4, rtol=0)


def test_dtype_bfloat16_writes_bfloat16_weights_close_to_the_float32_merge(tiny_chat_llama, merged, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter, _, expected = merged
    out = merge_to_directory(tiny_chat_llama, adapter, tmp_path / "bf16", dtype="bfloat16")
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.bfloat16
    torch.testing.assert_close(logits(model, chat_tokens(out)).float(), expected, atol=0.1, rtol=0.05)


def test_without_dtype_a_bfloat16_base_stays_bfloat16(tiny_chat_llama, merged, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_chat_llama).to(torch.bfloat16).save_pretrained(base)
    build_chat_tokenizer().save_pretrained(base)
    out = merge_to_directory(base, merged[0], tmp_path / "merged")
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("missing model", FileNotFoundError, "no model directory at"),
        ("missing adapter", FileNotFoundError, "no adapter directory at"),
        ("out is the model", ValueError, "is the model directory"),
        ("out inside the adapter", ValueError, "is inside the adapter directory"),
        ("out not empty", ValueError, "exists and is not empty: remove it or choose another --out"),
        ("out is a file", ValueError, "exists and is not a directory"),
        ("unknown dtype", ValueError, "--dtype must be one of float32, bfloat16, float16, got 'int8'"),
        ("adapter of another model", ValueError, "does not fit the model in"),
    ],
)
def test_bad_input_is_refused_with_one_clear_error_and_writes_nothing(
    tiny_chat_llama, tiny_llama, merged, tmp_path, case, error, message
):
    adapter, out, dtype = merged[0], tmp_path / "out", None
    model = tiny_chat_llama
    if case == "missing model":
        model = tmp_path / "no-model"
    elif case == "missing adapter":
        adapter = tmp_path / "no-adapter"
    elif case == "out is the model":
        out = tiny_chat_llama
    elif case == "out inside the adapter":
        out = adapter / "merged"
    elif case == "out not empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "out is a file":
        out.write_text("mine")
    elif case == "unknown dtype":
        dtype = "int8"
    else:  # an lm_head adapter of the other tiny Llama: its vocabulary has another size
        adapter = saved_adapter(tiny_llama, tmp_path / "other-adapter", targets=["q_proj", "lm_head"])
    before = {p: tree(p) for p in (tiny_chat_llama, merged[0])}
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(error, match=message) as raised:
        merge_to_directory(model, adapter, out, dtype=dtype)
    assert "\n" not in str(raised.value)
    assert sorted(os.listdir(tmp_path)) == listing  # no --out, no temporary directory
    assert {p: tree(p) for p in before} == before  # the inputs untouched
    if case == "out not empty":
        assert os.listdir(out) == ["keep.txt"]


def test_a_failure_mid_save_leaves_no_output_and_no_temporary_directory(tiny_chat_llama, merged, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    def failing_save(self, directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", failing_save)
    with pytest.raises(OSError, match="No space left on device"):
        merge_to_directory(tiny_chat_llama, merged[0], tmp_path / "deep" / "out")
    assert os.listdir(tmp_path / "deep") == []


def test_an_adapter_on_a_tied_output_head_is_refused_in_one_line(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tmp_path / "tied"
    tokenizer = build_chat_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_LLAMA, "vocab_size": len(tokenizer)}, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    adapter = saved_adapter(base, tmp_path / "adapter", targets=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to model.embed_tokens.weight: merging would") as e:
        merge_to_directory(base, adapter, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("with_labels", [True, False], ids=["labels.json", "head-shape"])
def test_a_seq_cls_adapter_merges_into_a_classifier_with_its_labels(tiny_chat_llama, tmp_path, with_labels):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model = adapted(
        tiny_chat_llama,
        ["q_proj", "v_proj"],
        AutoModelForSequenceClassification,
        task_type="SEQ_CLS",
        load={"num_labels": 3},
    )
    adapter = lk.save_adapter(model, tmp_path / "adapter")
    if with_labels:
        (adapter / "labels.json").write_text(json.dumps(["bad", "ok", "good"]))
    tokens = chat_tokens(tiny_chat_llama)
    expected = logits(model, tokens)
    out = merge_to_directory(tiny_chat_llama, adapter, tmp_path / "merged")
    merged_model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    torch.testing.assert_close(logits(merged_model, tokens), expected, atol=1e-4, rtol=0)
    config = AutoConfig.from_pretrained(out)
    assert config.num_labels == 3
    if with_labels:
        assert config.id2label == {0: "bad", 1: "ok", 2: "good"}
        assert config.label2id == {"bad": 0, "ok": 1, "good": 2}


@pytest.mark.parametrize(
    "shapes, expected",
    [
        ({"base_model.model.score.weight": (3, 32)}, 3),  # Llama, GPT-2, Mistral, ...
        ({"base_model.model.classifier.weight": (5, 32), "base_model.model.classifier.bias": (5,)}, 5),  # BERT
        (  # RoBERTa: dense, then out_proj
            {
                "base_model.model.classifier.dense.weight": (32, 32),
                "base_model.model.classifier.out_proj.weight": (4, 32),
            },
            4,
        ),
        ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 32)}, None),  # no head saved
    ],
    ids=["score", "classifier", "dense-then-out_proj", "no-head"],
)
def test_the_number_of_labels_is_the_output_size_of_the_saved_heads_last_layer(shapes, expected):
    from lorakit.inference.export import head_outputs

    assert head_outputs(shapes) == expected
