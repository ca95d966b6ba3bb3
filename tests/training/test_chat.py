"""Instruction and chat data (lorakit.training.chat): formats, which tokens the loss sees, and bad rows."""

import tempfile

import pytest
from helpers import CHATML, TINY_LLAMA, build_chat_tokenizer, write_jsonl

from lorakit.training.chat import language_dataset, load_chat_template, parse_row, read_conversations
from lorakit.training.data import IGNORE_INDEX

# ChatML again, with transformers' {% generation %} markers around each answer and its end-of-turn token: what
# TRL's assistant-only loss needs, and a second, independent account of where the answers are.
CHATML_MARKED = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATIONS = [
    [("user", "what colour is the sky"), ("assistant", "blue")],
    [("system", "you are helpful"), ("user", "what colour is the sky"), ("assistant", "blue")],
    [("user", "say hello"), ("assistant", "hello"), ("user", "and how many legs has a spider"), ("assistant", "eight")],
    [("user", "count"), ("assistant", "one two three"), ("user", "ok"), ("assistant", "yes"), ("user", "thanks")],
]


def messages(turns):
    return [{"role": role, "content": content} for role, content in turns]


def dataset(rows, tokenizer=None, fmt="auto", max_length=64, loss_on="completion", tmp_path=None):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    return language_dataset(read_conversations(path, fmt), tokenizer or build_chat_tokenizer(), max_length, loss_on)


def trained_tokens(tokenizer, example):
    return [tokenizer.convert_ids_to_tokens(t) for t in example.labels if t != IGNORE_INDEX]


# -- what the loss sees --------------------------------------------------------------------------------------


def test_every_assistant_turn_and_its_end_of_turn_token_are_trained_and_nothing_else(tmp_path):
    tokenizer = build_chat_tokenizer()
    rows = [{"messages": messages(CONVERSATIONS[2])}]
    (example,) = dataset(rows, tokenizer, tmp_path=tmp_path).examples
    assert trained_tokens(tokenizer, example) == ["hello", "<|im_end|>", "eight", "<|im_end|>"]
    assert example.input_ids == tokenizer.apply_chat_template(rows[0]["messages"], return_dict=True)["input_ids"]


def test_a_template_without_markers_gives_the_masks_of_its_generation_markers(tmp_path):
    """The prefix rendering of the plain template and transformers' {% generation %} mask of the marked one agree."""
    rows = [{"messages": messages(turns)} for turns in CONVERSATIONS]
    plain = dataset(rows, build_chat_tokenizer(CHATML), tmp_path=tmp_path).examples
    marked = dataset(rows, build_chat_tokenizer(CHATML_MARKED), tmp_path=tmp_path).examples
    assert [e.input_ids for e in plain] == [e.input_ids for e in marked]
    assert [e.labels for e in plain] == [e.labels for e in marked]


def test_prompt_completion_trains_the_completion_and_an_added_eos(tmp_path):
    tokenizer = build_chat_tokenizer()
    (example,) = dataset(
        [{"prompt": "what colour is the sky", "completion": " blue"}], tokenizer, tmp_path=tmp_path
    ).examples
    assert trained_tokens(tokenizer, example) == ["blue", "<|im_end|>"]


def test_conversational_prompt_completion_trains_what_follows_the_prompt(tmp_path):
    tokenizer = build_chat_tokenizer()
    row = {"prompt": messages(CONVERSATIONS[0][:1]), "completion": messages(CONVERSATIONS[0][1:])}
    (example,) = dataset([row], tokenizer, tmp_path=tmp_path).examples
    assert trained_tokens(tokenizer, example)[:2] == ["blue", "<|im_end|>"]


def test_loss_on_all_trains_every_token(tmp_path):
    (example,) = dataset([{"messages": messages(CONVERSATIONS[0])}], loss_on="all", tmp_path=tmp_path).examples
    assert example.labels is None and example.targets() == len(example.input_ids) - 1


def test_alpaca_and_sharegpt_rows_map_onto_prompt_completion_and_messages(tmp_path):
    tokenizer = build_chat_tokenizer()
    alpaca = {"instruction": "what colour is the", "input": "sky", "output": " blue"}
    pc = {"prompt": "what colour is the\n\nsky", "completion": " blue"}
    assert (
        dataset([alpaca], tokenizer, tmp_path=tmp_path).examples == dataset([pc], tokenizer, tmp_path=tmp_path).examples
    )
    sharegpt = {"conversations": [{"from": "human", "value": "say hello"}, {"from": "gpt", "value": "hello"}]}
    chat = {"messages": messages(CONVERSATIONS[2][:2])}
    assert (
        dataset([sharegpt], tokenizer, tmp_path=tmp_path).examples
        == dataset([chat], tokenizer, tmp_path=tmp_path).examples
    )


def test_long_examples_are_cut_from_the_right_and_those_left_without_an_answer_dropped_and_counted(tmp_path):
    rows = [{"messages": messages(CONVERSATIONS[0])}, {"messages": messages(CONVERSATIONS[2])}]
    data = dataset(rows, max_length=12, tmp_path=tmp_path)  # row 1 keeps 12 tokens, its answer among them
    assert (data.stats.examples, data.stats.truncated, data.stats.dropped) == (2, 1, 0)
    assert all(len(e.input_ids) <= 12 for e in data.examples)
    data = dataset(rows, max_length=8, tmp_path=tmp_path)  # neither answer starts within 8 tokens of row 1
    assert (data.stats.examples, data.stats.truncated, data.stats.dropped, data.stats.dropped_lines) == (1, 2, 1, [1])
    with pytest.raises(ValueError, match="no example has a token to learn from"):
        dataset(rows[:1], max_length=8, tmp_path=tmp_path)


# -- the real TRL ----------------------------------------------------------------------------------------------


def trl_labels(rows, tokenizer, **options):
    """The labels TRL's SFTTrainer builds for these rows (its own data preparation and collator)."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "vocab_size": len(tokenizer)}))
    args = SFTConfig(output_dir=tempfile.mkdtemp(), report_to=[], max_length=None, use_cpu=True, **options)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return [(row["input_ids"], trainer.data_collator([row])["labels"][0].tolist()) for row in trainer.train_dataset]


@pytest.mark.slow
def test_assistant_masks_equal_trls_assistant_only_loss(tmp_path):
    """TRL needs {% generation %} markers; lorakit finds the same tokens in the plain template's rendering."""
    rows = [{"messages": messages(turns)} for turns in CONVERSATIONS]
    theirs = trl_labels(rows, build_chat_tokenizer(CHATML_MARKED), assistant_only_loss=True)
    ours = dataset(rows, build_chat_tokenizer(CHATML), tmp_path=tmp_path).examples
    assert [(e.input_ids, e.labels) for e in ours] == theirs


@pytest.mark.slow
def test_completion_masks_equal_trls_completion_only_loss(tmp_path):
    tokenizer = build_chat_tokenizer()
    plain = [{"prompt": "what colour is the sky", "completion": " blue"}, {"prompt": "say", "completion": " hello hi"}]
    chat = [{"prompt": messages(t[:1]), "completion": messages(t[1:2])} for t in CONVERSATIONS[::2]]
    for rows in (plain, chat):
        theirs = trl_labels(rows, tokenizer, completion_only_loss=True)
        ours = dataset(rows, tokenizer, tmp_path=tmp_path).examples
        assert [(e.input_ids, e.labels) for e in ours] == theirs


# -- bad rows: one error naming the file and the line ----------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"text": "hi"}, {"messages": []}], r"line 2: a messages row in a file of text rows"),
        ([{"messages": [{"role": "robot", "content": "hi"}]}], r"line 1: message 0 has the unknown role 'robot'"),
        ([{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "hi"}]}], r"empty"),
        ([{"messages": messages([("user", "hi")])}], r"line 1: the conversation has no assistant turn"),
        ([{"prompt": "hi", "completion": messages([("assistant", "hi")])}], r"both be text or both be lists"),
        ([{"conversations": [{"from": "alien", "value": "hi"}]}], r"conversations\[0\] is from 'alien'"),
        ([{"question": "hi"}], r"line 1 has no field 'text', nor the fields of another format .*; it has: question"),
    ],
    ids=["mixed", "role", "empty", "no-answer", "types", "sharegpt-role", "unknown"],
)
def test_a_bad_row_is_one_error_naming_the_file_and_line(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message) as caught:
        dataset(rows, tmp_path=tmp_path)
    assert "data.jsonl" in str(caught.value)


def test_messages_on_a_tokenizer_without_a_template_ask_for_chat_template(tmp_path):
    with pytest.raises(ValueError, match=r"line 1: messages need a chat template.*--chat-template FILE"):
        dataset([{"messages": messages(CONVERSATIONS[0])}], build_chat_tokenizer(None), tmp_path=tmp_path)


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_the_line(tmp_path):
    # numbers each turn from the end: adding a turn renumbers every earlier one, so no prefix holds
    template = (
        "{% for m in messages %}{{ (messages|length - loop.index)|string + ' ' + m['content'] + ' ' }}{% endfor %}"
    )
    rows = [{"messages": messages(CONVERSATIONS[0])}, {"messages": messages(CONVERSATIONS[2])}]
    with pytest.raises(ValueError, match=r"line 1: the chat template renders the conversation up to turn 1 differ"):
        dataset(rows, build_chat_tokenizer(template), tmp_path=tmp_path)


def test_a_chat_template_file_that_is_not_jinja_names_the_file_and_line(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text("{% for m in messages %}\n{{ m['content'] }\n")
    with pytest.raises(ValueError, match=r"template.jinja: line 2: not a valid Jinja template"):
        load_chat_template(path)
    path.write_text(CHATML_MARKED)
    assert load_chat_template(path) == CHATML_MARKED


def test_a_forced_format_holds_every_row_to_it(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "hi", "prompt": "a", "completion": "b"}])
    assert read_conversations(path)[0].prompt == "a"  # auto: prompt/completion fields come before a text field
    assert read_conversations(path, "text")[0].text == "hi"
    with pytest.raises(ValueError, match="line 1: a messages row needs the field 'messages'"):
        read_conversations(path, "messages")
    assert parse_row({"text": "x"}, "text", "f: line 3").line == 3
