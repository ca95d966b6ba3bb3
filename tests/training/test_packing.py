"""Packing (lorakit.training.packing): a packed batch gives each example the loss and gradients it has alone,
rows are first-fit decreasing and drop no token, the first position of each member carries no loss, and bad
input or a model whose attention cannot be confined is refused."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import build_tiny_gpt2, build_tiny_llama
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from torch import nn

import lorakit as lk
from lorakit.training.data import IGNORE_INDEX, Example
from lorakit.training.packing import check_packing, collate_packed, pack_examples

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
# 13 tokens a row: FFD makes rows of 12 + 1, 9 + 4, 7 + 6 and 5 + 3 + 2 (10 tokens, then padding)
LENGTHS = [9, 2, 5, 12, 3, 7, 1, 4, 6]
MAX_LENGTH = 13


def token_examples(lengths: list[int], seed: int = 0) -> list[Example]:
    """Random tokens; example i starts with token 3 + i (so that a member names its example). Every third
    example has a "prompt" of two tokens without loss, every third plus one has labels None (all tokens)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i, n in enumerate(lengths):
        ids = [3 + i, *torch.randint(3, 100, (n - 1,), generator=g).tolist()]
        labels = None if i % 3 == 1 else list(ids)
        if i % 3 == 0:
            labels[:2] = [IGNORE_INDEX] * min(2, n)
        examples.append(Example(ids, labels=labels))
    return examples


def numbered_examples(lengths: list[int]) -> list[Example]:
    """Example i holds the tokens 1000·i, 1000·i + 1, ...: every token says where it came from."""
    return [Example([1000 * i + t for t in range(n)]) for i, n in enumerate(lengths)]


def members(row: Example) -> list[tuple[int, int]]:
    """(start, end) of each member of a packed row, from its position_ids."""
    starts = [t for t, p in enumerate(row.position_ids) if p == 0]
    return list(zip(starts, [*starts[1:], len(row.input_ids)], strict=True))


def targets(labels: list[int] | None, n: int) -> int:
    """How many tokens the causal-lm loss predicts: positions 1.. with a label."""
    return n - 1 if labels is None else sum(label != IGNORE_INDEX for label in labels[1:])


def naive_first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b in range(len(bins)):
            if room[b] >= lengths[i]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


# -- the equivalence the issue asks for ---------------------------------------------------------------------


def model_of(kind: str, attention: str, adapter: bool) -> nn.Module:
    model = (build_tiny_llama() if kind == "llama" else build_tiny_gpt2()).double()
    model.set_attn_implementation(attention)
    if adapter:
        torch.manual_seed(1)
        targets = LLAMA_TARGETS if kind == "llama" else GPT2_TARGETS
        lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=targets, init=False))
    return model


def packed_losses(model: nn.Module, rows: list[Example], count: int) -> torch.Tensor:
    """Each example's summed token loss (count,), from one forward pass over the packed rows."""
    batch = collate_packed(rows, pad_id=0, dtype=torch.float64)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, L, vocab)
    token = F.cross_entropy(  # (B, L - 1): token t predicts token t + 1
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    losses = [torch.zeros((), dtype=token.dtype)] * count
    for b, row in enumerate(rows):
        for start, end in members(row):  # the targets of positions start + 1 .. end - 1
            losses[row.input_ids[start] - 3] = token[b, start : end - 1].sum()
    return torch.stack(losses)


def alone_losses(model: nn.Module, examples: list[Example]) -> torch.Tensor:
    """Each example's summed token loss (count,), one forward pass each, without padding."""
    losses = []
    for e in examples:
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0]  # (n, vocab)
        labels = torch.tensor(e.input_ids if e.labels is None else e.labels)
        losses.append(F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum"))
    return torch.stack(losses)


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_each_example_has_the_same_loss_and_gradients_packed_as_alone(kind, attention, adapter):
    examples = token_examples(LENGTHS)
    rows = pack_examples(examples, MAX_LENGTH)
    assert len(rows) == 4 and max(len(members(r)) for r in rows) == 3  # shared rows, and one with padding
    model = model_of(kind, attention, adapter)
    packed = packed_losses(model, rows, len(examples))
    trained = [p for p in model.parameters() if p.requires_grad]
    packed_grads = torch.autograd.grad(packed.sum(), trained) if adapter else ()
    alone = alone_losses(model, examples)
    assert bool((alone[[0, 3, 5]] > 0).all())  # losses to compare, not zeros
    torch.testing.assert_close(packed, alone, atol=1e-6, rtol=0)
    if adapter:  # the adapter trains the same: the gradient of the summed loss, packed and alone
        for got, expected in zip(packed_grads, torch.autograd.grad(alone.sum(), trained), strict=True):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_restarting_positions_alone_keep_members_apart_only_without_a_cache():
    # why collate_packed passes a mask (the module's docstring): transformers finds packed sequences from the
    # positions itself, but only where there is no cache, and the config's default use_cache=True makes one
    rows = pack_examples(token_examples(LENGTHS), MAX_LENGTH)
    model = model_of("llama", "sdpa", adapter=False)
    batch = collate_packed(rows, pad_id=0, dtype=torch.float64)
    masked = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    positions = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    torch.testing.assert_close(model(**positions, use_cache=False).logits, masked, atol=1e-9, rtol=0)
    leaky = model(**positions).logits  # every member attends to the ones before it in its row
    assert float((leaky - masked).abs().max()) > 1e-2


# -- rows -------------------------------------------------------------------------------------------------------


@hypothesis_settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 16), max_size=40), st.integers(16, 40))
def test_rows_are_first_fit_decreasing_deterministic_and_drop_no_token(lengths, max_length):
    examples = numbered_examples(lengths)
    rows = pack_examples(examples, max_length)
    assert rows == pack_examples(examples, max_length)  # the same input, the same rows
    assert all(len(r.input_ids) <= max_length for r in rows)
    packed = [[r.input_ids[start] // 1000 for start, _ in members(r)] for r in rows]
    assert packed == naive_first_fit_decreasing(lengths, max_length)
    for row in rows:  # each member is its example, whole, with positions from 0
        for start, end in members(row):
            example = examples[row.input_ids[start] // 1000]
            assert row.input_ids[start:end] == example.input_ids
            assert row.position_ids[start:end] == list(range(end - start))
    assert sorted(t for r in rows for t in r.input_ids) == sorted(t for e in examples for t in e.input_ids)


def test_a_row_trains_the_tokens_its_members_train_and_never_a_members_first():
    examples = token_examples(LENGTHS)
    rows = pack_examples(examples, MAX_LENGTH)
    for row in rows:
        for start, end in members(row):
            example = examples[row.input_ids[start] - 3]
            expected = example.input_ids if example.labels is None else example.labels
            assert row.labels[start] == IGNORE_INDEX  # the previous member's last token predicts nothing
            assert row.labels[start + 1 : end] == expected[1:]
    # so a row's loss terms are its members' (what loss_count / Example.targets() count)
    assert sum(targets(r.labels, len(r.input_ids)) for r in rows) == sum(
        targets(e.labels, len(e.input_ids)) for e in examples
    )


def test_collate_pads_with_a_block_of_its_own_and_builds_a_block_diagonal_causal_mask():
    rows = pack_examples(numbered_examples([3, 2, 4]), 5)  # rows: [4] and [3 | 2]
    hand_made = Example([7, 8, 9], labels=[7, 8, 9], position_ids=[0, 1, 0])  # labels at a member's start
    batch = collate_packed([*rows, hand_made], pad_id=-1)
    assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[2000, 2001, 2002, 2003, -1], [0, 1, 2, 1000, 1001], [7, 8, 9, -1, -1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1], [0, 1, 0, 0, 1]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 2001, 2002, 2003, IGNORE_INDEX],
        [IGNORE_INDEX, 1, 2, IGNORE_INDEX, 1001],
        [IGNORE_INDEX, 8, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],  # a member's start and padding: no loss
    ]
    mask = batch["attention_mask"]
    assert mask.shape == (3, 1, 5, 5) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    allowed = (mask[:, 0] == 0).int().tolist()
    assert allowed[1] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert allowed[2] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]


# -- refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "examples, max_length, message",
    [
        ([Example([1, 2])], 0, "max_length must be a positive integer, got 0"),
        ([Example([1, 2]), Example([1, 2, 3, 4])], 3, "example 1 has 4 tokens, more than max_length 3: truncate it"),
        ([Example([])], 4, "example 0 has no tokens"),
        ([Example([1, 2], label=1)], 4, "example 0 has a class label: packing is for causal-lm examples"),
        ([Example([1, 2], position_ids=[0, 1])], 4, "example 0 has position_ids: it is packed already"),
        ([Example([1, 2], labels=[1])], 4, "example 0 has 1 labels for 2 tokens"),
    ],
)
def test_pack_refuses_what_it_cannot_pack(examples, max_length, message):
    with pytest.raises(ValueError, match=message):
        pack_examples(examples, max_length)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([], "no rows to collate"),
        ([Example([1, 2])], "row 0 has no position_ids: collate_packed takes rows from pack_examples"),
        ([Example([1, 2], position_ids=[1, 2])], "row 0: position_ids must start at 0 and step by 1"),
        ([Example([1, 2, 3], position_ids=[0, 2, 3])], "row 0: position_ids must start at 0 and step by 1"),
        ([Example([1, 2], position_ids=[0])], "row 0: input_ids, labels and position_ids must have one entry per"),
    ],
)
def test_collate_refuses_rows_that_are_not_packed(rows, message):
    with pytest.raises(ValueError, match=message):
        collate_packed(rows, pad_id=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_packing_accepts_eager_and_sdpa_models_and_changes_nothing(kind, dtype):
    for attention in ("sdpa", "eager"):
        model = model_of(kind, attention, adapter=True).to(dtype).train()
        state = torch.get_rng_state()
        check_packing(model, max_length=32)
        assert model.training and torch.equal(torch.get_rng_state(), state)


class IgnoresTheMask(nn.Module):
    """A model whose code drops the attention mask it is given (as custom model code might)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.inner(input_ids=input_ids, position_ids=position_ids)


def test_check_packing_refuses_attention_it_cannot_mask():
    model = build_tiny_llama()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"packing needs attention that takes a 4-D mask .* 'flash_attention_2'"):
        check_packing(model)
    model = build_tiny_llama()
    model.config.sliding_window = 16
    check_packing(model, max_length=16)
    with pytest.raises(ValueError, match="sliding_window is 16 tokens, shorter than the packed rows' 32"):
        check_packing(model, max_length=32)
    with pytest.raises(ValueError, match="does not keep packed examples apart"):
        check_packing(IgnoresTheMask(build_tiny_llama()))
    with pytest.raises(ValueError, match="packing needs a transformers model"):
        check_packing(nn.Linear(2, 2))


# -- the benchmark case ------------------------------------------------------------------------------------------


def test_the_packing_benchmark_case_runs_and_packs_its_skewed_examples_into_half_a_batch():
    # tests/bench runs `python -m bench --quick`, whose case list leaves this case out; here it runs at tiny sizes
    from bench.cases import packing, setting_cases, skewed_examples
    from bench.models import QUICK

    setting = dataclasses.replace(QUICK, batch=(4, 32), packing=True)
    assert [c.name for c in setting_cases(setting)][-1] == "packing 4×32"
    examples = skewed_examples(setting, 2)
    assert len(pack_examples(examples, 32)) == 2 and len(examples) > 4  # more examples than a padded batch
    timings = packing(setting, setting.build(torch.float32, torch.device("cpu")), torch.device("cpu"), 2, 0)
    assert set(timings) == {"packed", "padded"} and all(len(t) == 2 and min(t) > 0 for t in timings.values())
