"""Prompt encoding and end-of-sequence ids, the same for every mode."""

from __future__ import annotations

from transformers import GenerationConfig, PreTrainedTokenizerBase

from partition.models import ModelSource


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, raw: bool = False) -> list[int]:
    """Token ids for ``prompt``; instruct models get their chat template unless ``raw``."""
    return encode_messages(tokenizer, [{"role": "user", "content": prompt}], raw=raw)


def encode_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], raw: bool = False) -> list[int]:
    """Token ids of a conversation through the chat template, ready for the assistant's answer.
    With ``raw``, or a tokenizer without a template (the tiny test models), the contents joined by
    newlines are encoded as they are: one user message then gives ``encode_prompt(..., raw=True)``."""
    if not raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding-like mapping here; 4.x returned a list.
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer("\n".join(m["content"] for m in messages))["input_ids"]]


def eos_token_ids(source: ModelSource, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every id that ends generation: the generation config's, the model config's, the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(source.module, "generation_config", None)
    if gen is None and source.directory is not None:
        try:
            gen = GenerationConfig.from_pretrained(source.directory)
        except OSError:
            pass
    if gen is not None:
        ids |= _as_set(gen.eos_token_id)
    ids |= _as_set(getattr(source.config, "eos_token_id", None))
    ids |= _as_set(tokenizer.eos_token_id)
    return ids


def _as_set(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}
