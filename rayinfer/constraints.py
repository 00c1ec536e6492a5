"""Constrained output: a JSON schema, a regular expression or a list of choices that every
generated text must fit, enforced token by token (llguidance underneath).

``grammar(json_schema=..., regex=..., choices=...)`` turns what the user asked into a grammar, and
checks it, before Ray starts (no model needed). In an actor, ``Constraint(tokenizer, grammar,
vocab, eos)`` builds the tokenizer's side once; ``constraint.row()`` gives each row its own
``RowConstraint``: before a token is chosen, ``allow(scores)`` sets every token the grammar forbids
to -inf (end-of-sequence only once the output is complete; ``fill_bitmasks`` and
``apply_bitmask`` do it for many rows at once, one copy to the device); after, ``accept(token)``
moves the grammar on. A row that ends (``max_new_tokens`` reached) with ``satisfied`` false did not
fit: the generate task makes it a ``constraint_unmet`` error row, never an output.

Why llguidance (benchmarks/constrained.py, SmolLM2's 49,152-token vocabulary, 2 CPU cores): a
row's mask and token step cost 58-70 us (xgrammar: 8-12 us), under 2% of a CPU decode step per row
(~4.3 ms); compiling the issue's schema 1.4 ms. xgrammar is faster per token, but requires triton
on Linux x86-64 (a 286 MB wheel, of no use on CPUs) and its CPU kernel to apply a mask costs 244 us
a row; llguidance is one 3 MB wheel with no dependencies (and, by its maintainers' account, the
widest JSON-schema coverage).

JSON is constrained to ``json.dumps``' layout (", " and ": " between items, no other whitespace):
flexible whitespace lets a small model spend its tokens on newlines and never close the object.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

JSON_LAYOUT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class ConstraintError(ValueError):
    """A constraint that cannot be compiled (a bad regex, a schema llguidance cannot use)."""


def grammar(json_schema: dict[str, Any] | None = None, regex: str | None = None,
            choices: Sequence[str] | None = None) -> str:
    """The grammar for one of ``json_schema``, ``regex`` or ``choices``, checked (``ConstraintError``)."""
    import llguidance as llg

    given = [k for k, v in (("json_schema", json_schema), ("regex", regex), ("choices", choices)) if v is not None]
    if len(given) != 1:
        raise ConstraintError(f"give one of json_schema, regex, choices (got {', '.join(given) or 'none'})")
    try:
        if json_schema is not None:
            text = llg.LLMatcher.grammar_from_json_schema(json.dumps(json_schema), overrides=JSON_LAYOUT)  # type: ignore[arg-type]
        elif regex is not None:
            text = llg.LLMatcher.grammar_from_regex(regex)
        else:
            assert choices is not None
            if not choices or any(not isinstance(c, str) or not c for c in choices):
                raise ConstraintError("choices must be a non-empty list of non-empty strings")
            text = llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    except ValueError as exc:
        raise ConstraintError(_one_line(str(exc))) from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text)
    if is_error:
        raise ConstraintError(_one_line(messages[0]) if messages else "the grammar is not valid")
    return text


def _one_line(message: str) -> str:
    """llguidance's multi-line report (the regex, a caret, the grammar) as one line: its first line
    and the parser's own ``error:`` line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return "the grammar is not valid"
    error = next((line[len("error:"):].strip() for line in lines[1:] if line.startswith("error:")), None)
    return lines[0].rstrip(":") + (f": {error}" if error else "")


_PENALTY: dict[Any, Any] = {}


def apply_bitmask(scores: Any, bitmask: Any) -> None:
    """Add -inf to the scores [rows, vocab] of the tokens ``bitmask`` [rows, words] forbids, in
    place, on the scores' device (the bitmask is copied there once, a few KB a row).

    A bitmask is int32 words, little-endian: bit i is token i. Each byte is looked up in a table of
    its 8 tokens' penalties (0 allowed, -inf forbidden): ~40 us a row of 49,152 tokens on a CPU core,
    where unpacking to booleans and ``masked_fill`` took 4x that.
    """
    import torch

    table = _PENALTY.get(scores.device)
    if table is None:
        allowed = (torch.arange(256)[:, None] >> torch.arange(8)[None, :]) & 1 == 1
        table = _PENALTY[scores.device] = torch.zeros(256, 8).masked_fill_(~allowed, float("-inf")).to(scores.device)
    rows = scores.shape[0]
    words = bitmask.to(scores.device).reshape(rows, -1).contiguous().view(torch.uint8).int()
    penalty = table.index_select(0, words.reshape(-1)).view(rows, -1)
    scores += penalty[:, : scores.shape[-1]].to(scores.dtype)


def fill_bitmasks(rows: Sequence[RowConstraint | None], vocab: int) -> Any:
    """The bitmasks [rows, words] (int32, on the host) of many rows at once: each constrained row's
    from its matcher, every token allowed for a row without one (None)."""
    import torch

    masks = torch.full((len(rows), (vocab + 31) // 32), -1, dtype=torch.int32)
    for i, row in enumerate(rows):
        if row is not None:
            row.constraint.fill_bitmask(row.matcher, masks, i)
    return masks


class Constraint:
    """A grammar bound to a tokenizer (in an actor, once): hands out a matcher per row."""

    def __init__(self, tokenizer: Any, grammar_text: str, vocab: int, eos: Sequence[int],
                 kind: str = "constraint") -> None:
        import llguidance as llg
        import llguidance.hf
        import llguidance.torch

        self.vocab, self.kind = vocab, kind
        self.fill_bitmask = llguidance.torch.fill_next_token_bitmask  # looked up once, not per row and token
        try:
            info = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=sorted(eos))
        except ValueError as exc:  # WordPiece, slow (Python) tokenizers: tokens that are not text pieces
            raise ConstraintError(
                f"constrained output needs a fast tokenizer whose tokens are pieces of the text (byte-level BPE "
                f"or SentencePiece, as Llama, Qwen, Mistral, SmolLM2 have); this model's {type(tokenizer).__name__} "
                f"is not one ({exc})") from None
        self._template = llg.LLMatcher(info, grammar_text, log_level=0)
        if self._template.is_error():
            raise ConstraintError(self._template.get_error())

    def row(self) -> RowConstraint:
        return RowConstraint(self, self._template.deep_copy())

    def fits(self, tokens: Sequence[int]) -> bool:
        """Whether these tokens (a row's output, without end-of-sequence) are a complete output."""
        row = self.row()
        return all(row.accept(int(t)) for t in tokens) and row.satisfied


class RowConstraint:
    """One row's place in the grammar (a matcher that, once it refuses a token, stays in error)."""

    def __init__(self, constraint: Constraint, matcher: Any) -> None:
        self.constraint, self.matcher = constraint, matcher

    def allow(self, scores: Any) -> None:
        """Forbidden tokens' scores [1, vocab] (any device) become -inf, in place (for many rows
        at once: ``apply_bitmask(scores, fill_bitmasks(rows, vocab))``)."""
        apply_bitmask(scores, fill_bitmasks([self], self.constraint.vocab))

    def accept(self, token: int) -> bool:
        """Move on by ``token``; false when the grammar refuses it (or refused an earlier one)."""
        return bool(self.matcher.consume_token(token))

    @property
    def satisfied(self) -> bool:
        """The output so far is complete under the grammar."""
        return not self.matcher.is_error() and bool(self.matcher.is_accepting())


__all__ = ["Constraint", "ConstraintError", "RowConstraint", "apply_bitmask", "fill_bitmasks", "grammar"]
