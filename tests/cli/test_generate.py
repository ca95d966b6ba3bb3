"""`lorakit generate` (lorakit.cli.generate): it prints the library's answers, runs a --prompts file's rows with
their own adapters in one batch, shows base and adapter side by side with --compare, writes JSON lines with
--json, and refuses bad input with one line and exit code 2."""

import json

import pytest
import torch
from helpers import cli_error, run_cli, write_jsonl

import lorakit as lk
import lorakit.inference.generate
from lorakit.inference.generate import generate
from lorakit.training.models import load_model_and_tokenizer

CONVERSATION = [{"role": "system", "content": "you are a helpful bot"}, {"role": "user", "content": "say hello"}]


@pytest.fixture(scope="module")
def adapters(tiny_chat_llama, tmp_path_factory):
    """Two random, non-zero adapters for the tiny chat Llama, saved as directories named fr/ and de/."""
    root = tmp_path_factory.mktemp("adapters")
    configs = {
        "fr": lk.LoraConfig(r=4, alpha=8, target_modules="all-linear", init=False),
        "de": lk.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens"], init=False),
    }
    for seed, (name, config) in enumerate(configs.items(), start=1):
        model, _ = load_model_and_tokenizer(str(tiny_chat_llama), "causal-lm", None)
        torch.manual_seed(seed)
        lk.save_adapter(lk.inject(model, config), root / name)
    return {name: root / name for name in configs}


def answers_alone(model_dir, adapters, prompts, routes, max_new_tokens, base=False) -> list[str]:
    """Each prompt answered on its own by the library, its adapter active (or the base model)."""
    model, tokenizer = load_model_and_tokenizer(str(model_dir), "causal-lm", None)
    for name, directory in adapters.items():
        lk.load_adapter(model, directory, name)
    answers = []
    for prompt, name in zip(prompts, routes, strict=True):
        if base or name == lk.BASE:
            with lk.disabled(model):
                answers += generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens)
        else:
            lk.set_adapter(model, name)
            answers += generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens)
    return answers


def generate_args(model_dir, *extra) -> list[str]:
    return ["generate", "--model", str(model_dir), *[str(e) for e in extra]]


def test_a_prompt_prints_the_first_adapters_answer_alone(tiny_chat_llama, adapters, capsys):
    argv = generate_args(tiny_chat_llama, "--adapter", adapters["fr"], "--adapter", adapters["de"], "--prompt", "hi")
    code, out, err = run_cli(capsys, *argv, "--max-new-tokens", 6)
    assert (code, err) == (0, "")
    [expected] = answers_alone(tiny_chat_llama, adapters, ["hi"], ["fr"], 6)
    assert expected and out == expected + "\n"


def test_a_prompts_file_runs_its_rows_with_their_own_adapters_in_one_batch(
    tiny_chat_llama, adapters, tmp_path, capsys, monkeypatch
):
    rows = [
        {"prompt": "what colour is the sky", "adapter": "de"},
        {"prompt": "say hello"},  # the first adapter
        {"messages": CONVERSATION, "adapter": "__base__"},
        {"prompt": "count one two three", "adapter": "fr"},
        {"messages": CONVERSATION, "adapter": "de"},
    ]
    calls = []

    def counted(model, tokenizer, prompts, adapters=None, **kwargs):
        calls.append(adapters)
        return generate(model, tokenizer, prompts, adapters, **kwargs)

    monkeypatch.setattr(lorakit.inference.generate, "generate", counted)  # as `run` imports it
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    argv = generate_args(
        tiny_chat_llama, "--adapter", adapters["fr"], "--adapter", adapters["de"], "--prompts", prompts
    )
    code, out, _ = run_cli(capsys, *argv, "--max-new-tokens", 5, "--json")
    assert code == 0
    routes = ["de", "fr", lk.BASE, "fr", "de"]
    assert calls == [routes]  # one mixed batch through one model
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["adapter"] for r in records] == routes
    assert [r["prompt"] for r in records] == [row.get("prompt", row.get("messages")) for row in rows]
    prompt_values = [r["prompt"] for r in records]
    assert [r["answer"] for r in records] == answers_alone(tiny_chat_llama, adapters, prompt_values, routes, 5)
    assert len({r["answer"] for r in records if r["prompt"] == CONVERSATION}) == 2  # base and de differ


def test_compare_shows_the_base_and_the_adapter_answer_side_by_side(tiny_chat_llama, adapters, tmp_path, capsys):
    rows = [{"prompt": "say hello"}, {"messages": CONVERSATION}]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    argv = generate_args(tiny_chat_llama, "--adapter", adapters["fr"], "--prompts", prompts, "--max-new-tokens", 3)
    code, out, _ = run_cli(capsys, *argv, "--compare")
    assert code == 0
    values = ["say hello", CONVERSATION]
    base = answers_alone(tiny_chat_llama, adapters, values, ["fr", "fr"], 3, base=True)
    tuned = answers_alone(tiny_chat_llama, adapters, values, ["fr", "fr"], 3)
    assert base != tuned
    header = next(line for line in out.splitlines() if "prompt" in line)
    assert header.index("base model") < header.index("answer")
    for i, shown in enumerate(["say hello", "say hello"]):  # a conversation shows its last message
        row = next(line for line in out.splitlines() if line.split("│")[1:2] == [f" {i + 1} "])
        assert shown in row and row.index(base[i]) < row.rindex(tuned[i]), row

    code, out, _ = run_cli(capsys, *argv, "--compare", "--json")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["answer"], r["base_answer"]) for r in records] == list(zip(tuned, base, strict=True))


def test_a_messages_file_answers_each_conversation_as_the_assistants_next_turn(tiny_chat_llama, tmp_path, capsys):
    second = [*CONVERSATION, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "count"}]
    messages = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CONVERSATION}, {"messages": second}])
    code, out, _ = run_cli(
        capsys, *generate_args(tiny_chat_llama, "--messages", messages, "--json", "--max-new-tokens", 6)
    )
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    expected = answers_alone(tiny_chat_llama, {}, [CONVERSATION, second], [lk.BASE] * 2, 6)
    assert records == [
        {"prompt": conversation, "adapter": lk.BASE, "answer": answer}
        for conversation, answer in zip([CONVERSATION, second], expected, strict=True)
    ]


def test_a_prompt_is_plain_text_for_a_tokenizer_without_a_chat_template(tiny_llama, tmp_path, capsys):
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama), "causal-lm", None)
    torch.manual_seed(0)
    lk.save_adapter(lk.inject(model, lk.LoraConfig(r=2, target_modules="all-linear", init=False)), tmp_path / "a")
    argv = generate_args(tiny_llama, "--adapter", f"mine={tmp_path / 'a'}", "--prompt", "the cat sat", "--json")
    code, out, _ = run_cli(capsys, *argv, "--max-new-tokens", 5)
    assert code == 0
    lk.load_adapter(model.eval(), tmp_path / "a", "mine")
    [expected] = generate(model, tokenizer, ["the cat sat"], max_new_tokens=5)  # plain text, continued
    assert json.loads(out) == {"prompt": "the cat sat", "adapter": "mine", "answer": expected}


def test_sampling_repeats_with_its_seed(tiny_chat_llama, capsys):
    argv = generate_args(tiny_chat_llama, "--prompt", "hi", "--temperature", 1.5, "--top-p", 0.9, "--json")
    first = run_cli(capsys, *argv, "--seed", 1, "--max-new-tokens", 8)
    assert first[0] == 0
    assert run_cli(capsys, *argv, "--seed", 1, "--max-new-tokens", 8) == first
    assert run_cli(capsys, *argv, "--seed", 2, "--max-new-tokens", 8)[1] != first[1]


BAD_ROWS = {
    "bad-json": ['{"prompt": "hi"}\n', '{"prompt": "hi"\n'],
    "role": ['{"messages": [{"role": "robot", "content": "hi"}]}\n'],
    "adapter": ['{"prompt": "hi", "adapter": "es"}\n'],
    "field": ['{"prompt": "hi", "adaptor": "fr"}\n'],
    "both": ['{"prompt": "hi", "messages": []}\n'],
    "empty": ["\n"],
}


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-model", "no model directory at"),
        ("missing-adapter", "no adapter directory at"),
        ("missing-file", "no such file: "),
        ("same-name", "two adapters are named 'fr'"),
        ("bad-json", "prompts.jsonl: line 2: not valid JSON"),
        ("role", "prompts.jsonl: line 1: message 0 has the unknown role 'robot'"),
        (
            "adapter",
            "prompts.jsonl: line 1: adapter 'es' was not given with --adapter (given: fr; '__base__' for none)",
        ),
        ("field", "prompts.jsonl: line 1: unknown field 'adaptor'"),
        ("both", "prompts.jsonl: line 1: a row holds 'prompt' or 'messages'"),
        ("empty", "prompts.jsonl: no prompts in the file"),
        ("no-template", "prompts.jsonl: line 1: messages need a chat template, and the tokenizer has none"),
        ("--temperature=-1", "--temperature must be 0 (greedy) or more, got -1.0"),
        ("--top-p=0", "--top-p must be in (0, 1], got 0.0"),
        ("--top-p=1.5", "--top-p must be in (0, 1], got 1.5"),
        ("--max-new-tokens=0", "--max-new-tokens must be an integer of at least 1, got 0"),
        ("--compare", "--compare needs an --adapter to compare the base model with"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_chat_llama, tiny_llama, adapters, tmp_path, capsys, case, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(BAD_ROWS.get(case, ['{"messages": [{"role": "user", "content": "hi"}]}\n'])))
    model = tiny_llama if case == "no-template" else tiny_chat_llama
    fr = ["--adapter", str(adapters["fr"])]
    argv = {
        "missing-model": generate_args(tmp_path / "nowhere", "--prompt", "hi"),
        "missing-adapter": generate_args(model, "--adapter", tmp_path / "nowhere", "--prompt", "hi"),
        "missing-file": generate_args(model, "--prompts", tmp_path / "nowhere.jsonl"),
        "same-name": generate_args(model, *fr, "--adapter", f"fr={adapters['de']}", "--prompt", "hi"),
        "--compare": generate_args(model, "--prompt", "hi", "--compare"),
    }.get(case)
    if argv is None:
        flag = case.split("=") if case.startswith("--") else []
        argv = generate_args(model, *(fr if case == "adapter" else []), "--prompts", prompts, *flag)
    err = cli_error(argv, capsys)
    assert err.count("\n") == 1, err
    assert err.startswith("lorakit: error: ") and message in err, err
