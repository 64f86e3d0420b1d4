"""Prompts as token ids for the two ways of asking a shared context's queries.

* multi-turn (one session): turn 1 is ``first(context, q1)``; turn k appends ``follow(reply_{k-1}, q_k)`` to
  turn k-1's prompt, so every earlier prompt is an exact token prefix and the radix cache can serve it.
* multi-request (several sessions): every query is its own request ``first(context, q_k)``; the sessions
  share the context prefix only.

Formats: :class:`TokenFormat` (random ids, dummy weights), :class:`PlainFormat` (a ``Question:/Answer:``
transcript, for any model) and :class:`ChatFormat` (the model's chat template).
"""

from __future__ import annotations

from typing import Protocol

from benchmarks.multiturn.tokenization import Tokenizer
from benchmarks.multiturn.workload import Query, SharedContext
from sgl_minference.checks import check

FORMATS = ("plain", "chat")


class PromptFormat(Protocol):
    stop: list[str]  # stop strings for the server's sampler (empty: run to EOS / max_new_tokens)
    ignore_eos: bool  # token mode: always generate max_new_tokens, so outputs are comparable

    def first(self, ctx: SharedContext, query: Query) -> list[int]:
        """A session's first prompt: the context, then ``query``."""
        ...

    def follow(self, reply_text: str | None, reply_ids: list[int], query: Query) -> list[int]:
        """Ids to append to the previous prompt: the previous reply, then ``query``."""
        ...


class TokenFormat:
    """Context ids + question ids; a follow-up appends the reply's output ids + the next question's ids."""

    stop: list[str] = []
    ignore_eos = True

    def first(self, ctx: SharedContext, query: Query) -> list[int]:
        return ctx.context_ids + query.question_ids

    def follow(self, reply_text: str | None, reply_ids: list[int], query: Query) -> list[int]:
        return list(reply_ids) + query.question_ids


class PlainFormat:
    """``<bos>context\\n\\nQuestion: q\\nAnswer:`` then `` reply\\n\\nQuestion: q2\\nAnswer:`` per turn."""

    stop = ["\n\n", "\nQuestion:"]
    ignore_eos = False

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer

    def first(self, ctx: SharedContext, query: Query) -> list[int]:
        return self._tok.bos_ids + ctx.context_ids + self._tok.encode(f"\n\nQuestion: {query.question}\nAnswer:")

    def follow(self, reply_text: str | None, reply_ids: list[int], query: Query) -> list[int]:
        return self._tok.encode(f" {(reply_text or '').strip()}\n\nQuestion: {query.question}\nAnswer:")


class ChatFormat:
    """The model's chat template: one user message with the context and the first question, then an
    assistant reply and a user question per turn.

    The context is spliced in as its own ids (the template is rendered around a placeholder), and a follow-up
    is the text the template adds for one more exchange, which must extend the previous rendering.
    """

    stop: list[str] = []
    ignore_eos = False
    _PLACEHOLDER = "\u2063CONTEXT\u2063"  # invisible separators: no template or text contains this

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer

    def _user(self, question: str) -> dict[str, str]:
        return {"role": "user", "content": f"{self._PLACEHOLDER}\n\n{question}"}

    def first(self, ctx: SharedContext, query: Query) -> list[int]:
        text = self._tok.render_chat([self._user(query.question)], generation_prompt=True)
        if text.count(self._PLACEHOLDER) != 1:
            raise ValueError("tokenizer: the chat template does not render the user message verbatim")
        before, after = text.split(self._PLACEHOLDER)
        return self._tok.encode(before) + ctx.context_ids + self._tok.encode(after)

    def follow(self, reply_text: str | None, reply_ids: list[int], query: Query) -> list[int]:
        opened = [self._user("q")]
        prev = self._tok.render_chat(opened, generation_prompt=True)
        turns = opened + [{"role": "assistant", "content": (reply_text or "").strip()}, {"role": "user", "content": query.question}]
        full = self._tok.render_chat(turns, generation_prompt=True)
        if not full.startswith(prev):
            raise ValueError("tokenizer: the chat template re-renders earlier turns; use the plain format")
        return self._tok.encode(full[len(prev):])


def make_format(task: str, fmt: str, tokenizer: Tokenizer | None) -> PromptFormat:
    """The format for ``task``: token ids for ``tokens``, else ``fmt`` (``plain`` or ``chat``)."""
    if task == "tokens":
        return TokenFormat()
    if tokenizer is None:
        raise ValueError(f"tokenizer: task {task!r} needs one")
    if fmt == "plain":
        return PlainFormat(tokenizer)
    if fmt == "chat":
        return ChatFormat(tokenizer)
    raise ValueError(f"fmt: {fmt!r} is not one of {FORMATS}")


def multiturn_prompt(fmt: PromptFormat, ctx: SharedContext, replies: list[tuple[str | None, list[int]]]) -> list[int]:
    """Turn ``len(replies) + 1``'s prompt, given the replies ``(text, output_ids)`` of the earlier turns."""
    check(len(replies) < len(ctx.queries), "replies",
          f"{len(replies)} replies leave no query of {len(ctx.queries)} to ask")
    ids = fmt.first(ctx, ctx.queries[0])
    for (text, out_ids), query in zip(replies, ctx.queries[1:]):
        ids = ids + fmt.follow(text, out_ids, query)
    return ids
