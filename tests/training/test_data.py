"""Reading, tokenizing and batching training data (lorakit.training.data)."""

import json
import re

import pytest
import torch

from lorakit.training.chat import Conversation, language_dataset
from lorakit.training.data import IGNORE_INDEX, Example, classification_dataset, collate, epoch_order, read_records


def test_reads_jsonl_csv_and_plain_text(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one", "label": 1}\n\n{"text": "two", "label": 0}\n')
    (tmp_path / "a.csv").write_text('text,label\n"one, with comma",pos\ntwo,neg\n')
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    assert read_records(tmp_path / "a.jsonl", label_field="label") == [
        {"text": "one", "label": 1},
        {"text": "two", "label": 0},
    ]
    assert read_records(tmp_path / "a.csv", label_field="label")[0] == {"text": "one, with comma", "label": "pos"}
    assert read_records(tmp_path / "a.txt") == [{"text": "first line"}, {"text": "second line"}]


def test_custom_field_names(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "hello", "topic": "x"}\n')
    assert read_records(tmp_path / "a.jsonl", "body", "topic") == [{"text": "hello", "label": "x"}]


@pytest.mark.parametrize(
    "name, content, label_field, message",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', None, r"line 2 is not valid JSON"),
        ("list.jsonl", '{"text": "ok"}\n[1, 2]\n', None, r"line 2 is not a JSON object"),
        ("empty.jsonl", "\n\n", None, r"the dataset is empty"),
        ("empty.txt", "", None, r"the dataset is empty"),
        ("nofield.jsonl", '{"text": "a"}\n{"body": "b"}\n', None, r"line 2 has no field 'text' \(fields: body\)"),
        ("nolabel.jsonl", '{"text": "a"}\n', "label", r"no row has the label field 'label' \(line 1 has: text\)"),
        ("somelabels.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', "label", r"line 2 has no field 'label'"),
        ("num.jsonl", '{"text": 5}\n', None, r"line 1: field 'text' must be text"),
        ("nolabel.csv", "text\nhello\n", "label", r"no row has the label field 'label' \(line 2 has: text\)"),
        ("labels.txt", "hello\n", "label", r"a plain text file has no label field"),
        ("blank.jsonl", '{"text": "a"}\n{"text": " "}\n', None, r"line 2: field 'text' is empty"),
        ("blank.csv", 'text\nhello\n""\n', None, r"line 3: field 'text' is empty"),
        ("float.jsonl", '{"text": "a", "label": 0.5}\n', "label", r"must be text, an integer or true/false .*got 0.5"),
    ],
)
def test_bad_files_name_the_problem_and_the_line(tmp_path, name, content, label_field, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        read_records(tmp_path / name, label_field=label_field)


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    bom = "\ufeff"
    (tmp_path / "a.jsonl").write_text(bom + '{"text": "one"}\n', encoding="utf-8")
    (tmp_path / "a.csv").write_text(bom + "text,label\none,pos\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text(bom + "one\n", encoding="utf-8")
    assert read_records(tmp_path / "a.jsonl") == [{"text": "one"}]
    assert read_records(tmp_path / "a.csv", label_field="label") == [{"text": "one", "label": "pos"}]
    assert read_records(tmp_path / "a.txt") == [{"text": "one"}]


def test_only_line_breaks_end_a_line_not_unicode_separators_or_form_feeds(tmp_path):
    texts = ["a\u2028b", "c\x85d", "e\x0cf"]  # line separator, next line, form feed: all str.splitlines() breaks
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    (tmp_path / "a.txt").write_text("\r\n".join(texts) + "\r\n")
    assert read_records(tmp_path / "a.jsonl") == [{"text": t} for t in texts]
    assert read_records(tmp_path / "a.txt") == [{"text": t} for t in texts]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data file at"):
        read_records(tmp_path / "nope.jsonl")


def test_collate_pads_right_and_masks_padding_out_of_the_loss():
    batch = collate([Example([5, 6, 7]), Example([8])], pad_id=0, task="causal-lm")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    labelled = collate([Example([1, 2], 3), Example([4], 0)], pad_id=0, task="seq-cls")
    assert labelled["labels"].tolist() == [3, 0]


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    a = epoch_order(50, seed=3, epoch=1)
    assert sorted(a.tolist()) == list(range(50))
    assert torch.equal(a, epoch_order(50, seed=3, epoch=1))
    assert not torch.equal(a, epoch_order(50, seed=3, epoch=2))
    assert not torch.equal(a, epoch_order(50, seed=4, epoch=1))


def test_examples_are_truncated_to_max_length_and_labels_map_to_class_ids(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    records = [{"text": "the cat sat on the mat", "label": "b"}, {"text": "a dog ran", "label": "a"}]
    lm = language_dataset([Conversation(n, text=r["text"]) for n, r in enumerate(records, 1)], tokenizer, 4)
    assert [len(e.input_ids) for e in lm.examples] == [4, 3]
    assert lm.examples[0].input_ids == tokenizer("the cat sat on")["input_ids"]
    assert (lm.stats.examples, lm.stats.truncated, lm.stats.dropped) == (2, 1, 0)
    cls = classification_dataset(records, tokenizer, max_length=16)
    assert cls.labels == ["a", "b"] and [e.label for e in cls.examples] == [1, 0]
    with pytest.raises(ValueError, match="label 'c' is not one of the training labels"):
        classification_dataset([{"text": "sun", "label": "c"}], tokenizer, max_length=16, labels=cls.labels)


def test_a_text_without_tokens_is_refused_by_name_for_classification_and_dropped_for_language():
    def tokenizer(texts, truncation=False, max_length=None):  # one that drops what it cannot encode
        batch = [texts] if isinstance(texts, str) else texts
        ids = [[] if t == "\u200b" else [5, 6] for t in batch]
        return {"input_ids": ids[0] if isinstance(texts, str) else ids}

    with pytest.raises(ValueError, match=r"the text '\\u200b' has no tokens for this tokenizer"):
        classification_dataset([{"text": "fine", "label": 0}, {"text": "\u200b", "label": 1}], tokenizer, 8)
    data = language_dataset([Conversation(1, text="fine"), Conversation(2, text="\u200b")], tokenizer, 8)
    assert (data.stats.examples, data.stats.dropped, data.stats.dropped_lines) == (1, 1, [2])


# -- the order of a classifier's labels ------------------------------------------------------------------------


def test_integer_labels_sort_numerically_so_that_class_i_is_label_i():
    from lorakit.training.data import label_values

    shuffled = [5, 11, 0, 2, 10, 1, 3, 4, 9, 6, 8, 7]
    assert label_values([{"label": label} for label in shuffled]) == list(range(12))  # not [0, 1, 10, 11, 2, ...]
    as_text = [str(label) for label in shuffled]  # a CSV file's labels are text
    assert label_values([{"label": label} for label in as_text]) == [str(i) for i in range(12)]
    assert label_values([{"label": label} for label in ["-1", "01", "1", "+2"]]) == ["-1", "01", "1", "+2"]
    assert label_values([{"label": label} for label in ["pos", "neg", "10 stars", "2 stars"]]) == [
        "10 stars",
        "2 stars",
        "neg",
        "pos",
    ]
    assert label_values([{"label": True}, {"label": False}]) == [False, True]


def test_labels_of_different_kinds_are_refused_naming_the_clash():
    from lorakit.training.data import label_values

    records = [{"label": True}, {"label": 1}, {"label": "1"}, {"label": 0}]  # one label to Python, three to JSON
    with pytest.raises(ValueError) as error:
        label_values(records, "train.jsonl")
    assert str(error.value) == (
        'train.jsonl: the labels mix kinds, true (true/false), 1 (an integer), "1" (text): write every label the '
        "same way (all text, all integers or all true/false)"
    )


def test_an_eval_label_of_another_kind_is_not_taken_for_the_training_label_it_equals_in_python():
    class Words:  # a tokenizer stand-in: one token per word
        def __call__(self, texts, truncation, max_length):
            return {"input_ids": [[len(word) for word in text.split()] for text in texts]}

    train = [{"text": "a b", "label": 0}, {"text": "c", "label": 1}]
    dataset = classification_dataset(train, Words(), 8)
    assert dataset.labels == [0, 1] and [e.label for e in dataset.examples] == [0, 1]
    with pytest.raises(ValueError, match=re.escape("label True is not one of the training labels [0, 1]")):
        classification_dataset([{"text": "a", "label": True}], Words(), 8, dataset.labels)
