"""`lorakit predict`: label texts with a classifier adapter (see lorakit.inference.predict).

lorakit predict --model ./minilm --adapter cls/ --text "the battery lasts all day"
lorakit predict --model ./minilm --adapter cls/ --data test.jsonl [--json] [--batch-size 64]   # accuracy too
"""

from __future__ import annotations

import argparse
import json

from rich.table import Table
from rich.text import Text

from lorakit.io.console import make_console
from lorakit.training.data import label_key, read_records

__all__ = ["add_parser"]

BATCH_SIZE = 32


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="label texts with a classifier adapter: each text's label and scores, and accuracy on labelled data",
        description="Load the base model with a seq-cls adapter (lorakit finetune --task seq-cls) and give each "
        "text its label and the probability of every label, batched. The labels are named as in labels.json "
        "beside the adapter. Where the --data file holds labels, the accuracy is printed too.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="the base model: a transformers model directory")
    p.add_argument("--adapter", required=True, metavar="DIR", help="a seq-cls adapter directory trained on it")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", metavar="TEXT", help="one text to label")
    source.add_argument(
        "--data",
        metavar="FILE",
        help="texts to label: .jsonl, .csv (with a header) or plain text, one a line; with labels, the accuracy",
    )
    p.add_argument("--text-field", default="text", metavar="NAME", help="the text field of --data rows (default: text)")
    p.add_argument(
        "--label-field",
        default="label",
        metavar="NAME",
        help="the label field of --data rows, where they have one (default: label)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=BATCH_SIZE,
        metavar="N",
        help=f"texts per forward pass (default: {BATCH_SIZE})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='one JSON line per text, {"text", "label", "score", "scores"} (and "expected" where the data has '
        "labels), the accuracy on stderr",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Reads and checks the texts before the model loads, labels them in batches, and prints the labels (and the
    accuracy where the data has labels) as a table, or JSON lines."""
    from lorakit.inference.predict import load_classifier, predict

    if args.text is not None:
        if not args.text.strip():
            raise ValueError("--text is empty")
        records = [{"text": args.text}]
    else:
        records = read_records(args.data, args.text_field, args.label_field, labels_required=False)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    classifier = load_classifier(args.model, args.adapter)
    expected = [record["label"] for record in records if "label" in record]  # every row's, or none
    known = {label_key(label) for label in classifier.labels}
    unknown = [label for label in expected if label_key(label) not in known]
    if unknown:
        raise ValueError(f"{args.data}: label {unknown[0]!r} is not one of the adapter's labels {classifier.labels}")
    predictions = predict(classifier, [record["text"] for record in records], args.batch_size)
    correct = sum(label_key(p.label) == label_key(e) for p, e in zip(predictions, expected, strict=bool(expected)))
    accuracy = f"accuracy {correct / len(expected):.4f} ({correct} of {len(expected)})" if expected else None

    if args.json:
        for record, prediction in zip(records, predictions, strict=True):
            line = {"text": record["text"], "label": prediction.label, "score": prediction.score}
            line["scores"] = prediction.scores
            if "label" in record:
                line["expected"] = record["label"]
            print(json.dumps(line, ensure_ascii=False), flush=True)
        if accuracy:
            make_console(stderr=True).print(accuracy)
        return
    console = make_console()
    if args.text is not None:
        console.print(f"{predictions[0].label} ({predictions[0].score:.4f})")
        return
    table = Table("#", "text", "label", "score", *(["expected"] if expected else []), show_edge=False)
    for i, (record, prediction) in enumerate(zip(records, predictions, strict=True), start=1):
        cells = [str(i), Text(record["text"]), Text(str(prediction.label)), f"{prediction.score:.4f}"]
        table.add_row(*cells, *([Text(str(record["label"]))] if expected else []))
    console.print(table)
    if accuracy:
        console.print(accuracy)
