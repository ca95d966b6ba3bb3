"""The chat workflow end to end, as a user runs it: conversations → `finetune` → `generate` → `merge`."""

import json
import random

import pytest
import torch
from helpers import run_cli, write_jsonl

from lorakit.training.metrics import read_metrics

# Twelve questions with one answer each; every conversation asks two of them.
QA = [
    ("what colour is the sky", "blue"),
    ("what colour is the grass", "green"),
    ("what colour is snow", "white"),
    ("how many legs has a spider", "eight"),
    ("how many legs has an ant", "six"),
    ("how many legs has a dog", "four"),
    ("say hello", "hello"),
    ("say hi", "hi"),
    ("count", "one two three"),
    ("thanks", "you are welcome"),
    ("what is my name", "bot"),
    ("are you helpful", "yes"),
]


def conversations(n=50, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        turns = []
        for question, answer in rng.sample(QA, 2):
            turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"messages": turns})
    return rows


@pytest.mark.slow
def test_a_chat_adapter_reproduces_its_training_answers_and_stops_at_the_end_of_turn(tiny_chat_llama, tmp_path, capsys):
    rows = conversations()
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "run"
    # lm_head too: a random tiny Llama's frozen head keeps its logits flat, so answers would win by a hair
    train = ["--steps", "400", "--lr", "5e-3", "--batch-size", "10", "--dropout", "0", "--warmup-ratio", "0"]
    train += ["--targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"]
    code, _, err = run_cli(capsys, "finetune", "--model", tiny_chat_llama, "--data", data, "--out", out, *train)
    assert code == 0, err
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < 0.05  # learned by heart, with a margin that no thread count's round-off can flip

    # every assistant turn of the first ten conversations, asked with the conversation before it
    prompts, expected = [], []
    for row in rows[:10]:
        for k, message in enumerate(row["messages"]):
            if message["role"] == "assistant":
                prompts.append({"messages": row["messages"][:k]})
                expected.append(message["content"])
    questions = write_jsonl(tmp_path / "questions.jsonl", prompts)
    code, stdout, err = run_cli(
        capsys, "generate", "--model", tiny_chat_llama, "--adapter", out, "--messages", questions, "--json"
    )
    assert code == 0, err
    answers = [json.loads(line)["answer"] for line in stdout.splitlines()]
    assert answers == expected  # word for word, and nothing after: the end-of-turn token came next

    # the merged model answers the same with plain transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = tmp_path / "merged"
    code, _, err = run_cli(capsys, "merge", "--model", tiny_chat_llama, "--adapter", out, "--out", merged)
    assert code == 0, err
    model, tokenizer = AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged)
    for prompt, answer in list(zip(prompts, expected, strict=True))[:4]:
        ids = tokenizer.apply_chat_template(prompt["messages"], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
        new = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
        assert tokenizer.decode(new, skip_special_tokens=True).strip() == answer
        assert new[len(tokenizer(answer, add_special_tokens=False)["input_ids"])] == tokenizer.eos_token_id
