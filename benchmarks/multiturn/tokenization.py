"""The little a workload needs from a tokenizer, and an adapter for Hugging Face tokenizers.

Prompts are tokenized on the client and sent to SGLang as ``input_ids``: the generator knows every prompt's
exact length, a multi-turn prompt is built by appending token lists (so the previous prompt is an exact
prefix and the radix cache can hit all of it), and the same code serves servers started with
``--skip-tokenizer-init``.
"""

from __future__ import annotations

from typing import Protocol


class Tokenizer(Protocol):
    """Text -> token ids, without special tokens; ``bos_ids`` are the ids the model puts before a prompt."""

    bos_ids: list[int]

    def encode(self, text: str) -> list[int]: ...

    def render_chat(self, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
        """The model's chat template applied to ``messages`` (``{"role", "content"}`` dicts), as text."""
        ...


class HFTokenizer:
    """:class:`Tokenizer` over a ``transformers`` tokenizer (``AutoTokenizer`` of a model folder)."""

    def __init__(self, hf_tokenizer) -> None:
        self._tok = hf_tokenizer
        # The ids the tokenizer adds around a text on its own (BOS for Llama, nothing for Qwen): whatever
        # precedes the plain encoding of a probe text.
        probe = "probe"
        plain = self.encode(probe)
        full = list(self._tok(probe, add_special_tokens=True)["input_ids"])
        cut = len(full) - len(plain)
        self.bos_ids = full[:cut] if cut > 0 and full[cut:] == plain else []

    @classmethod
    def from_pretrained(cls, path: str) -> HFTokenizer:
        from transformers import AutoTokenizer  # imported here: token-id runs need no transformers

        return cls(AutoTokenizer.from_pretrained(path))

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def render_chat(self, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
        if not getattr(self._tok, "chat_template", None):
            raise ValueError("tokenizer: has no chat template (use the plain prompt format)")
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
