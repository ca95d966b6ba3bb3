"""Classifying texts with a seq-cls adapter (lorakit.inference.predict): the probabilities are the softmax of the
adapted model's logits, whatever the batch, the labels are named from labels.json (or LABEL_i without it), and an
adapter that is not a classifier is refused."""

import json

import pytest
import torch

import lorakit as lk
from lorakit.engine.model import adapter_parameters
from lorakit.inference.predict import load_classifier, predict

LABELS = ["sad", "calm", "glad"]
TEXTS = ["the cat sat on the mat", "a dog", "rain falls day and night on the park", "sun"]


def classifier_adapter(model_dir, directory, labels=LABELS):
    """A seq-cls adapter with random factors and head on the tiny Llama, and that adapted model."""
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3).eval()
    base.config.pad_token_id = 0
    model = lk.inject(base, lk.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    lk.save_adapter(model, directory)
    if labels is not None:
        (directory / "labels.json").write_text(json.dumps(labels))
    return model


def test_scores_are_the_softmax_of_the_adapted_models_logits_in_any_batch(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    model = classifier_adapter(tiny_llama, tmp_path / "cls")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    with torch.no_grad():  # each text alone: no padding
        expected = torch.cat([model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1) for text in TEXTS])

    classifier = load_classifier(tiny_llama, tmp_path / "cls", device="cpu")
    assert classifier.model.config.id2label == {0: "sad", 1: "calm", 2: "glad"}
    for batch_size in (1, 3):
        predictions = predict(classifier, TEXTS, batch_size=batch_size)
        scores = torch.tensor([[p.scores[name] for name in LABELS] for p in predictions])
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
        assert [p.label for p in predictions] == [LABELS[i] for i in expected.argmax(-1).tolist()]
        assert [p.score for p in predictions] == pytest.approx(expected.max(-1).values.tolist(), abs=1e-5)


def test_without_labels_json_the_classes_are_named_as_transformers_names_them(tiny_llama, tmp_path):
    classifier_adapter(tiny_llama, tmp_path / "cls", labels=None)
    classifier = load_classifier(tiny_llama, tmp_path / "cls", device="cpu")
    assert classifier.labels == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert set(predict(classifier, TEXTS[:1])[0].scores) == {"LABEL_0", "LABEL_1", "LABEL_2"}


def test_an_adapter_that_is_not_a_classifier_is_refused(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model = lk.inject(AutoModelForCausalLM.from_pretrained(tiny_llama), lk.LoraConfig(target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path / "lm")
    with pytest.raises(ValueError, match=r"is not a classifier \(task_type None, not 'SEQ_CLS'\)"):
        load_classifier(tiny_llama, tmp_path / "lm")
