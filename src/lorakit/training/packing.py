"""Packing (`--packing`): several causal-lm examples share one row of `max_length` tokens, and none sees another.

    rows = pack_examples(examples, max_length)          # once, before the epochs: a pure function of its input
    batch = collate_packed(rows[i : i + 8], pad_id)     # input_ids, labels, position_ids, attention_mask (4-D)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits

A packed row is trained exactly as its members would be one by one: the same loss per example, the same
gradients (tests/training/test_packing.py holds a tiny Llama and a tiny GPT-2, with and without an adapter, to
that in float64). Three things make it so:

- positions restart at 0 for each member (`position_ids`), so that absolute position embeddings (GPT-2's)
  see each member where it would be alone; rotary ones (Llama's) depend only on the distance between two
  tokens of one member, which packing does not change;
- attention never crosses a member's edge: `collate_packed` passes a block-diagonal causal mask, token i
  attends to token j only when both belong to the same member and j ≤ i;
- the first position of each member carries IGNORE_INDEX in `labels`, so the last token of one member never
  learns to predict the first of the next (the loss predicts labels[t + 1] from the logits at t).

**Why an explicit 4-D mask, and not the model's own packed-sequence support.** In transformers 5.25 Llama,
GPT-2 and the other decoders build their attention mask with `masking_utils.create_causal_mask`, which can
detect packing by itself: `find_packed_sequence_indices` starts a new sequence wherever `position_ids` do not
step by +1 and ANDs a "same sequence" term into the causal mask. But `_preprocess_mask_arguments` consults it
only when the 2-D `attention_mask` is None *and* there is no cache, and `LlamaModel.forward` makes a
`DynamicCache` whenever `use_cache` is on, which is every config's default: with restarting `position_ids`
alone, the tiny Llama's members attend to each other (logits off by 0.17 against the example alone, eager and
sdpa, train and eval mode; exact with `use_cache=False`). lorakit's loader turns `use_cache` off, but a
correctness that hangs on a flag set elsewhere, and on each model's code passing `position_ids` on to its
mask, is not one to build on. A 4-D mask is different: `_preprocess_mask_arguments` returns it as is ("If the
mask is already 4D, simply return as-is"), before any cache or padding logic, for every attention
implementation, and then

- eager attention adds it to the scores (`attn_weights = attn_weights + attention_mask`, then softmax), so it
  must be *additive*: 0 where attention is allowed and a very negative number elsewhere. A boolean mask would
  be added as 1 and 0 (measured: logits off by 0.12 on the tiny Llama, 0.06 on GPT-2) — hence a float mask;
- sdpa passes it to `torch.nn.functional.scaled_dot_product_attention` as `attn_mask`. The mask is made in
  the model's own dtype (`collate_packed(..., dtype=)`), as transformers' `eager_mask` makes its own in
  `inputs_embeds.dtype`: torch 2.13 accepts a float32 mask for any query dtype, and it is right for float32,
  bfloat16 and float16 queries, but its CPU kernel gets float64 queries wrong with a float32 mask beyond a
  few tokens (output off by 3.4 at 13 tokens on random inputs; exact with a float64 or a boolean mask).

Every query attends at least to itself (padding too: each row's padding is one more block of its own, with
positions from 0), so no row of the mask is all masked and softmax never sees only -inf. The masked value is
the dtype's most negative finite number, as in transformers' `eager_mask`.

**Limits** (`check_packing` refuses them): attention other than eager and sdpa. flash-attention reads a mask
as a 2-D padding mask (`_upad_input`) and packs through `position_ids` only for a batch of one row (GPU
only); flex-attention would add a tensor mask as a score modification, untested here. And a sliding-window
or chunked-attention model whose window is shorter than the rows would lose its window, since the 4-D mask
replaces the masks the model would build. The mask costs batch × L² × 4 bytes in float32 (8 rows of 2,048
tokens: 128 MiB; half that in bfloat16), and sdpa with a mask cannot take its `is_causal` fast path.

**Determinism and resumption.** `pack_examples` is a pure function of the examples and `max_length`:
first-fit decreasing (longest first, ties by index), members in their original order within a row. Pack the
dataset once, and the rows are a dataset like any other: the epoch order drawn from (seed, epoch) permutes
rows instead of examples, so a resumed run meets the same rows in the same order.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from lorakit.training.data import IGNORE_INDEX, Example

__all__ = ["MASKABLE_ATTENTION", "check_packing", "collate_packed", "pack_examples"]

# The attention implementations that take an additive 4-D mask as is (see the module's docstring).
MASKABLE_ATTENTION = ("eager", "sdpa")


def pack_examples(examples: list[Example], max_length: int) -> list[Example]:
    """Packs causal-lm examples into rows of at most `max_length` tokens, first-fit decreasing.

    Examples are placed longest first (ties in their order in `examples`), each into the first row with room
    for it, a new row where none has; within a row, members keep their order in `examples`. Each row is an
    Example whose `input_ids` concatenate its members', whose `labels` concatenate theirs (a member's None:
    every token) with the first position of each member set to IGNORE_INDEX, and whose `position_ids` restart
    at 0 for each member. No token is dropped, and the same input always gives the same rows.

    Args:
        examples: causal-lm examples (no class `label`, not packed already), each of 1 to `max_length` tokens.
        max_length: the most tokens of a row, at least 1.

    Returns:
        The packed rows, in the order they were opened (the first holds the longest example).

    Raises:
        ValueError: `max_length` below 1; an example with no tokens, more than `max_length` tokens (truncate
            it first), a class label, `position_ids` (packed already) or `labels` of another length than its
            `input_ids`.
    """
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        if n == 0:
            raise ValueError(f"example {i} has no tokens")
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length {max_length}: truncate it first")
        if e.label is not None:
            raise ValueError(f"example {i} has a class label: packing is for causal-lm examples")
        if e.position_ids is not None:
            raise ValueError(f"example {i} has position_ids: it is packed already")
        if e.labels is not None and len(e.labels) != n:
            raise ValueError(f"example {i} has {len(e.labels)} labels for {n} tokens")
    members = _first_fit_decreasing([len(e.input_ids) for e in examples], max_length)
    return [_row([examples[i] for i in sorted(row)]) for row in members]


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """The indices of `lengths` in each bin of `capacity`, first-fit decreasing, in O(n log n).

    A max tree over n bins (at most n are ever needed) holds each bin's room; bins not opened yet have all of
    `capacity`, so "the leftmost bin with room" finds the open bins first and opens the next one only when
    none of them fits: first fit, without a scan over the open bins.
    """
    n = len(lengths)
    size = 1 << max(n - 1, 0).bit_length()  # leaves: a power of two ≥ n
    room = [capacity] * (2 * size)  # room[size + b]: bin b's room; room[k]: the most of its two children
    bins: list[list[int]] = []
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        k = 1
        while k < size:  # down to the leftmost leaf with room for lengths[i]
            k = 2 * k if room[2 * k] >= lengths[i] else 2 * k + 1
        b = k - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        room[k] -= lengths[i]
        while k > 1:
            k //= 2
            room[k] = max(room[2 * k], room[2 * k + 1])
    return bins


def _row(members: list[Example]) -> Example:
    input_ids, labels, position_ids = [], [], []
    for e in members:
        n = len(e.input_ids)
        input_ids += e.input_ids
        labels += [IGNORE_INDEX, *(e.input_ids if e.labels is None else e.labels)[1:]]
        position_ids += range(n)
    return Example(input_ids=input_ids, labels=labels, position_ids=position_ids)


def collate_packed(rows: list[Example], pad_id: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Right-padded tensors of packed rows, for `model(**{k: v for k, v in batch.items() if k != "labels"})`.

    Args:
        rows: packed rows (`pack_examples`): each with `position_ids` that start at 0 and either step by 1 or
            restart at 0 where a member starts.
        pad_id: the token that fills each row up to the longest one.
        dtype: the attention mask's, the model's own (that of its input embeddings). float32 also serves
            bfloat16 and float16 models; a float64 model needs float64 (see the module's docstring).

    Returns:
        A dict of four tensors, L the longest row's length:

        - input_ids (B, L), long: the rows, then `pad_id`;
        - labels (B, L), long: each row's `labels` (None: its tokens), IGNORE_INDEX on padding and at the first
          position of every member, whatever the row says there;
        - position_ids (B, L), long: the rows' own, and 0, 1, 2, ... over the padding;
        - attention_mask (B, 1, L, L), `dtype`, additive: 0.0 where query i may attend key j (same member, or
          both padding, and j ≤ i), the dtype's most negative finite number elsewhere: a block-diagonal causal
          mask, which transformers' eager and sdpa attention use as is (see the module's docstring).

    Raises:
        ValueError: no rows; a `dtype` that is not a floating-point one; a row without `position_ids` (not
            packed), or whose positions do not start at 0 and step by 1 or restart at 0, or whose `labels` or
            `position_ids` differ in length from its tokens.
    """
    if not rows:
        raise ValueError("no rows to collate")
    if not dtype.is_floating_point:
        raise ValueError(f"the attention mask's dtype must be a floating-point one (the model's), got {dtype}")
    for i, row in enumerate(rows):
        n, pos = len(row.input_ids), row.position_ids
        if pos is None:
            raise ValueError(f"row {i} has no position_ids: collate_packed takes rows from pack_examples")
        if len(pos) != n or (row.labels is not None and len(row.labels) != n):
            raise ValueError(f"row {i}: input_ids, labels and position_ids must have one entry per token")
        if not pos or pos[0] != 0 or any(b not in (0, a + 1) for a, b in pairwise(pos)):
            raise ValueError(f"row {i}: position_ids must start at 0 and step by 1, or restart at 0 for a member")
    width = max(len(row.input_ids) for row in rows)
    count = len(rows)
    input_ids = torch.full((count, width), pad_id, dtype=torch.long)  # (B, L)
    labels = torch.full((count, width), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    position_ids = torch.arange(width).repeat(count, 1)  # (B, L); padding: 0, 1, 2, ... from its start
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.input_ids if row.labels is None else row.labels)
        position_ids[i, :n] = torch.tensor(row.position_ids)
        position_ids[i, n:] -= n
    starts = position_ids == 0  # (B, L): the first token of each member, and of the padding
    labels[starts] = IGNORE_INDEX
    block = starts.cumsum(-1)  # (B, L): which member (or padding) each token is in
    same = block[:, :, None] == block[:, None, :]  # (B, L, L): query i and key j in one block
    allowed = same & torch.ones(width, width, dtype=torch.bool).tril()  # (B, L, L): ... and j ≤ i
    mask = torch.zeros(count, 1, width, width, dtype=dtype)  # (B, 1, L, L)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask}


def check_packing(model: nn.Module, max_length: int | None = None) -> None:
    """Refuses a model whose attention a packed batch cannot confine to each member.

    Cheap checks first: the attention implementation must be one that takes the additive 4-D mask as is
    (MASKABLE_ATTENTION), and a sliding window or attention chunk, where the config has one, must hold
    `max_length` tokens (the packed mask replaces the window). Then a probe: one row holding two members of
    5 and 11 tokens, against the second alone, under no_grad and in eval mode (the mode is restored after, and
    no random number generator is drawn from): the second member's logits must agree, to round-off of the
    model's dtype. Call it before the model is wrapped for DDP or sharded with FSDP.

    Args:
        model: a transformers causal LM (its `config` says its attention implementation), with or without
            adapters.
        max_length: the rows' length, for the window check (None: no window check).

    Raises:
        ValueError: the model has no transformers config, an attention implementation that does not take a 4-D
            mask, a window shorter than `max_length`, or logits that the other member of its row changes.
    """
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if config is None:
        raise ValueError("packing needs a transformers model (one with a config that names its attention)")
    if implementation not in MASKABLE_ATTENTION:
        raise ValueError(
            f"packing needs attention that takes a 4-D mask ({' or '.join(MASKABLE_ATTENTION)}); this model uses "
            f"{implementation!r}: load it with attn_implementation='sdpa', or train without packing"
        )
    for name in ("sliding_window", "attention_chunk_size"):
        window = getattr(config, name, None)
        if max_length is not None and isinstance(window, int) and window < max_length:
            raise ValueError(
                f"the model's {name} is {window} tokens, shorter than the packed rows' {max_length}: packing "
                "would drop the window; lower --max-length to it, or train without packing"
            )
    _probe(model)


def _probe(model: nn.Module) -> None:
    parameter = next(model.parameters())
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None) or model.config.vocab_size
    dtype = getattr(getattr(embeddings, "weight", None), "dtype", parameter.dtype)
    tokens = [(7919 * k + 13) % vocab for k in range(16)]  # fixed tokens: no generator is drawn from
    first, second = Example(tokens[:5]), Example(tokens[5:])
    batch = collate_packed(pack_examples([first, second], 16), pad_id=0, dtype=dtype)
    inputs = {k: v.to(parameter.device) for k, v in batch.items() if k != "labels"}
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(**inputs).logits[0, 5:].double()  # (11, vocab): the second member in the row
            alone = model(input_ids=torch.tensor([second.input_ids], device=parameter.device)).logits[0].double()
    finally:
        model.train(training)
    # round-off of the model's dtype over a few layers, and far below what a token of the other member moves
    exact = dtype in (torch.float32, torch.float64)
    tolerance = (1e-4 if exact else 5e-2) * max(1.0, float(alone.abs().max()))
    error = float((packed - alone).abs().max())
    if not error <= tolerance:
        raise ValueError(
            "this model does not keep packed examples apart: with the block-diagonal mask and restarting "
            f"positions, an example's logits moved by {error:.3g} next to another one (its code may ignore a 4-D "
            "attention mask or position_ids); train it without packing"
        )
