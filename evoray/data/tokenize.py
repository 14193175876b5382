"""Tokenization of (prompt, response) pairs with labels on response tokens only.

The text a model sees is ``prompt + sep + response`` (``sep`` defaults to one space), followed by
the tokenizer's EOS token when ``add_eos``. Prompt and ``sep + response`` are tokenized
separately and concatenated, so the prompt/response boundary is exact. Labels are ``-100`` on the
special prefix (BOS, if the tokenizer adds one) and the prompt, and the token ids on the response.

Truncation policy: the response is never cut. When the pair is longer than ``max_length``, the
prompt is cut **from the left** (its end, next to the response, is what matters for the answer),
keeping the special prefix. An example whose response leaves no room for at least one prompt
token (``len(prefix) + 1 + len(response) > max_length``) is an overflow: an error, or, with
``on_overflow="skip"``, a skip that the caller gets counted, never a silently empty label.

Batches are padded on the right, so a sample's positions and logits do not depend on how much
padding its batch has (left padding would shift position ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from evoray.errors import EvorayError

__all__ = ["IGNORE", "Encoded", "ResponseTooLong", "encode_pair", "encode_pairs", "collate"]

IGNORE = -100


class ResponseTooLong(EvorayError, ValueError):
    """A response alone does not fit in ``max_length``."""


@dataclass(frozen=True)
class Encoded:
    """One tokenized pair. ``labels`` has ``IGNORE`` on prefix and prompt tokens."""

    input_ids: list[int]
    labels: list[int]
    prompt_tokens_cut: int = 0

    @property
    def n_response_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def special_prefix(tokenizer) -> list[int]:
    """Tokens the tokenizer puts before any text (e.g. ``[bos]``), found by probing."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    n = len(full) - len(plain)
    return list(full[:n]) if n > 0 and full[n:n + len(plain)] == plain else []


def encode_pair(tokenizer, prompt: str, response: str, max_length: int, *, sep: str = " ",
                add_eos: bool = True, prefix: list[int] | None = None) -> Encoded:
    """Tokenize one pair (see the module docstring for the policy).

    Raises:
        ResponseTooLong: when the response leaves no room for one prompt token.
    """
    if prefix is None:
        prefix = special_prefix(tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(sep + response, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    room = max_length - len(prefix) - len(response_ids)
    if room < 1:
        raise ResponseTooLong(f"the response is {len(response_ids)} tokens, which with "
                              f"{len(prefix)} special token(s) and one prompt token exceeds "
                              f"max_length={max_length}")
    cut = max(0, len(prompt_ids) - room)
    prompt_ids = prompt_ids[cut:]
    context = list(prefix) + prompt_ids
    return Encoded(context + response_ids, [IGNORE] * len(context) + response_ids, cut)


def encode_pairs(tokenizer, records: list[dict], max_length: int, *,
                 on_overflow: Literal["error", "skip"] = "error", sep: str = " ",
                 add_eos: bool = True) -> tuple[list[Encoded], list[str]]:
    """Tokenize records with ``prompt`` and ``response`` fields.

    Returns:
        ``(encoded, skipped_ids)``: ``skipped_ids`` lists the overflowing records' ids when
        ``on_overflow="skip"`` (always empty with ``"error"``, which raises instead).
    """
    if on_overflow not in ("error", "skip"):
        raise ValueError(f"on_overflow must be 'error' or 'skip', got {on_overflow!r}")
    prefix = special_prefix(tokenizer)
    encoded, skipped = [], []
    for rec in records:
        try:
            encoded.append(encode_pair(tokenizer, rec["prompt"], rec["response"], max_length,
                                       sep=sep, add_eos=add_eos, prefix=prefix))
        except ResponseTooLong as e:
            if on_overflow == "error":
                raise ResponseTooLong(f"record {rec.get('id')!r}: {e}") from None
            skipped.append(str(rec.get("id")))
    return encoded, skipped


def collate(batch: list[Encoded], pad_token_id: int,
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch into ``input_ids``, ``attention_mask`` and ``labels`` (B×T int64)."""
    if not batch:
        raise ValueError("collate needs at least one example")
    length = max(len(e.input_ids) for e in batch)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
