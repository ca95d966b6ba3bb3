"""Generating text (lorakit.inference.generate): greedy answers are transformers' own, tokens after the end of
a turn are never answers, a mixed batch gives each prompt the answer of its adapter alone, streaming hands over
the same text, sampling repeats with its seed, and bad settings or prompts are refused."""

import pytest
import torch

import lorakit as lk
from lorakit.engine.model import lora_layers
from lorakit.inference.generate import generate, generate_ids, prompt_ids, stop_token_ids
from lorakit.training.models import load_model_and_tokenizer

QUESTION = [
    {"role": "system", "content": "you are a helpful bot"},
    {"role": "user", "content": "how many legs has a spider"},
]
PROMPTS = ["what colour is the sky", "say hello", QUESTION, "count one two three", "hi"]


def load(path):
    """The model (float32, eval mode) and its tokenizer, as `lorakit generate` loads them."""
    model, tokenizer = load_model_and_tokenizer(str(path), "causal-lm", None)
    return model.float().eval(), tokenizer


def with_two_adapters(model):
    """Two random, non-zero adapters with other ranks and targets ("b" also on the embedding), "a" active."""
    torch.manual_seed(1)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules="all-linear", init=False), "a")
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens"], init=False), "b")
    lk.set_adapter(model, "a")
    return model


def transformers_greedy(model, ids: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    """transformers' own greedy decoding of one unpadded prompt: its new tokens, up to max_new_tokens."""
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("fixture, prompt", [("tiny_chat_llama", QUESTION), ("tiny_llama", "the cat sat on")])
def test_greedy_answer_equals_transformers_generate_token_for_token(request, fixture, prompt):
    model, tokenizer = load(request.getfixturevalue(fixture))
    with_two_adapters(model)  # "a" active: the answer of an adapted model
    ids = prompt_ids(tokenizer, prompt)
    expected = transformers_greedy(model, ids, 8, stop_token_ids(model, tokenizer))
    assert len(expected) == 8  # no stop token: every one of the 8 tokens is compared
    assert generate_ids(model, tokenizer, [prompt], max_new_tokens=8) == [expected]
    assert generate(model, tokenizer, [prompt], max_new_tokens=8) == [tokenizer.decode(expected)]


def test_generation_stops_at_the_end_of_turn_token_and_leaves_it_and_the_padding_out(tiny_chat_llama):
    model, tokenizer = load(tiny_chat_llama)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(model, tokenizer) == [end]
    free = generate_ids(model, tokenizer, ["say hello"], max_new_tokens=8)[0]
    # a token the answer first emits at step k ≥ 2: swap its output row with <|im_end|>'s, and step k ends the turn
    k = next(k for k in range(2, len(free)) if free[k] not in free[:k])
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    with torch.no_grad():
        model.lm_head.weight[[end, free[k]]] = model.lm_head.weight[[free[k], end]].clone()
    theirs = transformers_greedy(model, prompt_ids(tokenizer, "say hello"), 8, [end])
    assert theirs[: k + 1] == [*free[:k], end]  # transformers emits the end of turn at step k, then pads
    assert generate(model, tokenizer, ["say hello"], max_new_tokens=8) == [tokenizer.decode(free[:k])]

    # beside a row that goes on (an adapter's): the stopped row holds no end-of-turn token and none of the padding
    with_two_adapters(model)  # on the attention and MLP layers: the swapped output rows stay as they are
    lk.set_adapter(model, "a")
    goes_on = generate_ids(model, tokenizer, ["say hello"], max_new_tokens=8)[0]
    assert len(goes_on) > k
    assert generate_ids(model, tokenizer, ["say hello"] * 2, [lk.BASE, "a"], max_new_tokens=8) == [free[:k], goes_on]


def test_a_mixed_batch_gives_each_prompt_exactly_the_answer_of_its_adapter_alone(tiny_chat_llama):
    model, tokenizer = load(tiny_chat_llama)
    with_two_adapters(model)
    routes = ["a", "b", lk.BASE, "b", "a"]
    mixed = generate_ids(model, tokenizer, PROMPTS, routes, max_new_tokens=6)
    alone = []
    for prompt, name in zip(PROMPTS, routes, strict=True):
        if name == lk.BASE:
            with lk.disabled(model):
                alone += generate_ids(model, tokenizer, [prompt], max_new_tokens=6)
        else:
            lk.set_adapter(model, name)
            alone += generate_ids(model, tokenizer, [prompt], max_new_tokens=6)
    assert mixed == alone
    # the three routes really answer differently: the same prompt under each
    each = generate_ids(model, tokenizer, ["say hello"] * 3, ["a", "b", lk.BASE], max_new_tokens=6)
    assert len({tuple(answer) for answer in each}) == 3
    assert all(layer.routing is None for _, layer in lora_layers(model))  # no routing left after generation


def test_streamed_pieces_add_up_to_the_returned_answers(tiny_chat_llama):
    model, tokenizer = load(tiny_chat_llama)
    with_two_adapters(model)
    pieces: dict[int, list[str]] = {}
    answers = generate(
        model, tokenizer, PROMPTS, ["a", "b", lk.BASE, "a", "b"], max_new_tokens=6,
        stream=lambda i, text: pieces.setdefault(i, []).append(text),
    )  # fmt: skip
    assert all(answers)
    assert ["".join(pieces[i]) for i in range(len(PROMPTS))] == answers
    assert max(len(p) for p in pieces.values()) > 1  # text came in pieces, as generated, not all at the end


def test_text_is_a_user_message_with_a_chat_template_and_plain_text_without(tiny_chat_llama, tiny_llama):
    chat = load(tiny_chat_llama)[1]
    expected = chat("<|im_start|>user\nsay hello<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert prompt_ids(chat, "say hello") == expected["input_ids"]
    assert prompt_ids(chat, [{"role": "user", "content": "say hello"}]) == expected["input_ids"]
    plain = load(tiny_llama)[1]
    assert prompt_ids(plain, "the cat sat") == plain("the cat sat")["input_ids"]


def test_sampling_repeats_with_its_seed_and_leaves_the_callers_random_state_alone(tiny_chat_llama):
    model, tokenizer = load(tiny_chat_llama)
    settings = {"max_new_tokens": 8, "temperature": 1.5, "top_p": 0.95}
    state = torch.get_rng_state()
    first = generate_ids(model, tokenizer, PROMPTS, seed=3, **settings)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate_ids(model, tokenizer, PROMPTS, seed=3, **settings) == first
    assert generate_ids(model, tokenizer, PROMPTS, seed=4, **settings) != first
    assert first != generate_ids(model, tokenizer, PROMPTS, max_new_tokens=8)  # not the greedy answers


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer of at least 1, got 0"),
        ({"temperature": -0.5}, r"temperature must be 0 \(greedy\) or more, got -0.5"),
        ({"temperature": float("nan")}, "temperature must be 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"prompts": []}, "no prompts"),
        ({"prompts": [[{"role": "robot", "content": "hi"}]]}, "prompt 0: message 0 has the unknown role 'robot'"),
        ({"prompts": [[]]}, "prompt 0: messages must be a non-empty list"),
        ({"adapters": ["a"]}, "got 1 adapter names for 2 prompts"),
        ({"adapters": ["a", "zzz"]}, "unknown adapter 'zzz'"),
    ],
)
def test_bad_settings_and_prompts_are_refused(tiny_chat_llama, kwargs, message):
    model, tokenizer = load(tiny_chat_llama)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"]), "a")
    arguments = {"prompts": ["hi", "say hello"], **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, tokenizer, **arguments)


def test_messages_need_a_chat_template(tiny_llama):
    model, tokenizer = load(tiny_llama)
    with pytest.raises(ValueError, match="prompt 0: messages need a chat template, and the tokenizer has none"):
        generate(model, tokenizer, [[{"role": "user", "content": "the cat"}]])
