"""A small labelled text task, made offline and the same every time: short news-like sentences on four topics
(sports, weather, food, technology), each built from a template and word lists, labelled with its topic.

Used by the tests of `lorakit study` and for the README's MiniLM study:

    python tests/topics.py DIR        # DIR/train.jsonl (400 rows) and DIR/eval.jsonl (200 rows)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SUBJECTS = {
    "sports": ["the striker", "the home team", "our goalkeeper", "the young sprinter", "the coach", "the captain"],
    "weather": ["the forecast", "a cold front", "the storm", "heavy rain", "the morning fog", "a heat wave"],
    "food": ["the chef", "the new bakery", "my grandmother", "the street vendor", "the restaurant", "the recipe"],
    "tech": ["the startup", "the new phone", "the software update", "the chip maker", "the app", "the server"],
}  # fmt: skip
VERBS = {
    "sports": ["scored twice in", "was injured during", "celebrated after", "trained hard before", "lost"],
    "weather": ["is expected during", "moved in overnight before", "flooded the roads during", "cleared up after"],
    "food": ["served a spicy soup for", "baked fresh bread before", "grilled salmon for", "added garlic to"],
    "tech": ["crashed during", "shipped a faster chip before", "fixed the battery bug after", "was hacked during"],
}  # fmt: skip
OBJECTS = {
    "sports": ["the final match", "the championship", "the second half", "the derby", "the penalty shootout"],
    "weather": ["the weekend", "the afternoon", "the commute", "the holiday", "the night"],
    "food": ["the dinner service", "the wedding feast", "the lunch crowd", "the tasting menu", "breakfast"],
    "tech": ["the product launch", "the upgrade", "the security audit", "the developer conference", "the beta test"],
}  # fmt: skip
OPENINGS = ["", "reports say ", "today ", "apparently ", "according to locals, ", "in other news, "]


def topic_rows(n: int, seed: int) -> list[dict]:
    """`n` rows {"text", "label"}, the topics drawn uniformly."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(sorted(SUBJECTS))
        opening = rng.choice(OPENINGS)
        subject, verb, obj = (rng.choice(words[topic]) for words in (SUBJECTS, VERBS, OBJECTS))
        text = f"{opening}{subject} {verb} {obj}"
        rows.append({"text": text, "label": topic})
    return rows


def write_topic_files(directory: Path, train: int = 400, held_out: int = 200) -> tuple[Path, Path]:
    """DIR/train.jsonl and DIR/eval.jsonl (different seeds); returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n, seed in (("train.jsonl", train, 0), ("eval.jsonl", held_out, 1)):
        path = directory / name
        path.write_text("".join(json.dumps(row) + "\n" for row in topic_rows(n, seed)), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/topics.py DIR")
    for written in write_topic_files(Path(sys.argv[1])):
        print(written)
