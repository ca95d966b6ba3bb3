"""labels.json (lorakit.io.labels): read back as written, bad files refused, and the id2label / label2id a
transformers config names the classes with."""

import json

import pytest

from lorakit.io.labels import LABELS_NAME, label_config, labels_json, read_labels


@pytest.mark.parametrize("labels", [["neg", "pos"], list(range(12)), [False, True]])
def test_labels_are_read_back_as_written(tmp_path, labels):
    (tmp_path / LABELS_NAME).write_text(labels_json(labels))
    assert read_labels(tmp_path) == labels
    assert read_labels(tmp_path / "nowhere") is None


@pytest.mark.parametrize(
    "content",
    ["[1, 2", '{"a": 1}', '["only"]', '["a", "a"]', "[1, true]", '[1, "1"]', "[1.5, 2]", '[["a"], "b"]'],
    ids=["not-json", "object", "one-label", "repeated", "bool-and-int", "int-and-text", "float", "nested"],
)
def test_a_file_that_is_not_a_list_of_distinct_labels_is_refused(tmp_path, content):
    (tmp_path / LABELS_NAME).write_text(content)
    with pytest.raises(ValueError, match=r"labels\.json"):
        read_labels(tmp_path)


def test_a_config_names_each_class_by_its_labels_text():
    assert label_config([3, 10]) == {"id2label": {0: "3", 1: "10"}, "label2id": {"3": 0, "10": 1}}
    assert json.loads(json.dumps(label_config(["neg", "pos"])))["label2id"] == {"neg": 0, "pos": 1}
