"""The SVD tools on the adapters `lorakit finetune --task seq-cls` writes, which hold a classifier copy
(modules_to_save) and its bias beside the factors, and labels.json: inspect lists those tensors, resize keeps them
and the labels unchanged, combine adds them up with the weights and says so (or refuses where it cannot tell how),
compare compares the factors and says what it skipped."""

import json

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file

import lorakit as lk
from lorakit.engine.model import adapter_parameters
from lorakit.tools.stored import AdapterState, extra_kind

LABELS = ["negative", "neutral", "positive"]
HEAD = ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]  # in file order
TOKENS = torch.randint(1, 50, (3, 6), generator=torch.Generator().manual_seed(0))


def base():
    """A tiny BERT classifier of three classes, the same weights on every call."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    return BertForSequenceClassification(config).eval()


def classifier_adapter(directory, seed=1, labels=LABELS):
    """A "trained" seq-cls adapter on `base()`: random factors and a random classifier copy, with labels.json."""
    model = lk.inject(base(), lk.LoraConfig(r=2, alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lk.save_adapter(model, directory)
    (directory / "labels.json").write_text(json.dumps(labels))
    with torch.no_grad():
        return directory, model(input_ids=TOKENS).logits


def test_inspect_lists_the_classifier_copy_beside_the_layers(tmp_path, capsys):
    adapter, _ = classifier_adapter(tmp_path / "cls")
    state = AdapterState.load(adapter)
    assert [layer.path.rsplit(".", 1)[-1] for layer in state.layers()] == ["query", "value"]
    assert list(state.extras()) == HEAD
    assert {extra_kind(key, state.config) for key in HEAD} == {"modules_to_save copy"}
    assert len(list(lk.inspect(adapter))) == 2

    code, out, err = run_cli(capsys, "inspect", adapter)
    assert code == 0, err
    assert "Besides the LoRA factors" in out and "classifier.weight" in out and "modules_to_save copy" in out
    code, out, _ = run_cli(capsys, "inspect", adapter, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row.get("layer", row.get("tensor")) for row in rows][2:] == HEAD
    assert rows[3] == {"tensor": HEAD[1], "kind": "modules_to_save copy", "shape": [3, 16], "dtype": "float32"}


def test_resize_keeps_the_classifier_and_labels_and_loads_in_peft_with_the_same_outputs(tmp_path, capsys):
    from peft import PeftModel

    adapter, expected = classifier_adapter(tmp_path / "cls")
    code, out, err = run_cli(capsys, "resize", adapter, "--energy", "1.0", "--out", tmp_path / "resized")
    assert code == 0, err
    out = " ".join(out.split())  # lines wrap at the console's width
    assert "kept unchanged the tensors besides the LoRA factors: 2 (classifier.bias, classifier.weight" in out
    resized = tmp_path / "resized"
    before, after = load_file(adapter / "adapter_model.safetensors"), load_file(resized / "adapter_model.safetensors")
    assert all(torch.equal(after[key], before[key]) for key in HEAD)
    assert json.loads((resized / "labels.json").read_text()) == LABELS
    config = json.loads((resized / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    with torch.no_grad():  # full rank kept: the same classifier, in lorakit and in PEFT
        ours = lk.load_adapter(base(), resized)(input_ids=TOKENS).logits
        theirs = PeftModel.from_pretrained(base(), resized).eval()(input_ids=TOKENS).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=0)


def test_combine_adds_the_classifier_copies_up_with_the_weights_and_says_so(tmp_path, capsys):
    one, _ = classifier_adapter(tmp_path / "one", seed=1)
    two, _ = classifier_adapter(tmp_path / "two", seed=2)
    argv = ["combine", one, two, "--weights", "0.25", "0.75", "--method", "cat", "--out", tmp_path / "both"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    out = " ".join(out.split())
    assert "added up the tensors besides the LoRA factors as Σ wᵢ Tᵢ (an average): 2 (classifier.bias" in out
    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    both = load_file(tmp_path / "both" / "adapter_model.safetensors")
    for key in HEAD:
        torch.testing.assert_close(both[key], 0.25 * a[key] + 0.75 * b[key])
    assert json.loads((tmp_path / "both" / "labels.json").read_text()) == LABELS
    state = lk.combine([one, two], [2.0, 1.0])
    assert state.report["extras"] == {"summed": 2, "kept": 0, "weight_sum": 3.0}


def test_combine_refuses_classifiers_whose_labels_or_heads_differ(tmp_path):
    one, _ = classifier_adapter(tmp_path / "one")
    other_labels, _ = classifier_adapter(tmp_path / "other", seed=2, labels=["bad", "meh", "good"])
    with pytest.raises(ValueError, match=r"adapters 1 and 2 have different labels \(labels.json\)"):
        lk.combine([one, other_labels])
    no_head = lk.AdapterState.load(one)
    no_head.tensors = {k: t for k, t in no_head.tensors.items() if k not in HEAD}
    with pytest.raises(ValueError, match="hold different tensors besides their LoRA factors"):
        lk.combine([one, no_head])


def test_compare_compares_the_factors_and_says_what_it_skipped(tmp_path, capsys):
    one, _ = classifier_adapter(tmp_path / "one", seed=1)
    two, _ = classifier_adapter(tmp_path / "two", seed=2)
    code, out, err = run_cli(capsys, "compare", one, two)
    assert code == 0, err
    assert f"compared the LoRA factors only; skipped in {one}: 2 (classifier.bias, classifier.weight" in " ".join(
        out.split()
    )
    code, out, err = run_cli(capsys, "compare", one, two, "--json")
    assert [json.loads(line)["layer"].rsplit(".", 1)[-1] for line in out.splitlines()] == ["query", "value"]
    assert f"skipped in {two}" in " ".join(err.split())  # stdout holds the JSON lines alone
