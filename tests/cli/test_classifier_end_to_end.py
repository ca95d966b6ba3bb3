"""From a JSONL file of twelve integer classes to labels everywhere: `lorakit finetune --task seq-cls` on the tiny
Llama, then the same label for every text in lorakit (`lorakit predict`), in PEFT (`PeftModel.from_pretrained` on
the saved adapter, logit i meaning label i, as labels.json says) and in a transformers pipeline over the model
`lorakit merge` writes (its config names each class). Sorted as text, labels 0-11 would put 10 and 11 second and
third, and logit 2 would mean label 10."""

import json
import random

import torch
from helpers import WORDS, finetune_args, run_cli, write_jsonl

from lorakit.cli import main

KEYWORDS, FILLERS = WORDS[:12], WORDS[12:]  # class c: a text holding KEYWORDS[c] among two fillers


def rows(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    found = []
    for _ in range(n):
        label = rng.randrange(12)
        words = [KEYWORDS[label], *rng.sample(FILLERS, 2)]
        rng.shuffle(words)
        found.append({"text": " ".join(words), "label": label})
    return found


def test_twelve_classes_map_logits_to_labels_alike_in_lorakit_peft_and_a_pipeline(tiny_llama, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    train_rows = rows(0, 96)
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    test_rows = train_rows[:24]  # texts it has learned: where it is right, a wrong mapping shows
    test = write_jsonl(tmp_path / "test.jsonl", test_rows)
    adapter = tmp_path / "cls"
    argv = finetune_args(tiny_llama, train, adapter, "--task", "seq-cls", "--epochs", "8", "--batch-size", "16")
    assert main([*argv, "--lr", "1e-2", "--dropout", "0"]) == 0
    assert json.loads((adapter / "labels.json").read_text()) == list(range(12))  # class i is label i
    expected = [row["label"] for row in test_rows]

    # lorakit
    code, out, err = run_cli(capsys, "predict", "--model", tiny_llama, "--adapter", adapter, "--data", test, "--json")
    assert code == 0, err
    assert [json.loads(line)["label"] for line in out.splitlines()] == expected
    assert err.strip() == "accuracy 1.0000 (24 of 24)"

    # PEFT: the adapter on a base of twelve classes; the argmax is the label itself
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=12)
    base.config.pad_token_id = tokenizer.pad_token_id
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        batch = tokenizer([row["text"] for row in test_rows], return_tensors="pt")  # three words each: no padding
        assert peft_model(**batch).logits.argmax(-1).tolist() == expected

    # a pipeline over the merged model prints each class by its name
    assert (
        main(["merge", "--model", str(tiny_llama), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    )
    classify = pipeline("text-classification", model=str(tmp_path / "merged"), device="cpu")
    assert [result["label"] for result in classify([row["text"] for row in test_rows])] == list(map(str, expected))
