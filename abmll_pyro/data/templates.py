"""Prompt templates: how an input, its options and in-context demonstrations become text.

A template has two methods: ``prompt(input, demonstrations) -> str`` (the shared context) and
``continuation(option) -> str`` (the text scored after it). An option's score is the LM's
log-likelihood of the continuation's tokens given the prompt's tokens; the two are tokenized
separately (as MetaICL does), so an option's tokens never merge with the prompt's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from abmll_pyro.data.tasks import Example

__all__ = ["Template", "DirectTemplate", "ChatTemplate", "make_template"]


class Template(Protocol):
    def prompt(self, input: str, demonstrations: Sequence[Example] = ()) -> str: ...

    def continuation(self, option: str) -> str: ...


@dataclass(frozen=True)
class DirectTemplate:
    """MetaICL's "direct" format: ``demo_1.input + sep + demo_1.answer + between + ... + input``,
    continued by ``sep + option``. Defaults: ``sep=" "``, ``between="\\n\\n"``."""

    sep: str = " "
    between: str = "\n\n"

    def prompt(self, input: str, demonstrations: Sequence[Example] = ()) -> str:
        demos = "".join(f"{d.input}{self.sep}{d.target_text}{self.between}" for d in demonstrations)
        return demos + input

    def continuation(self, option: str) -> str:
        return self.sep + option


@dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's chat template: each demonstration is a user turn (its input) and an
    assistant turn (its answer); the input is the last user turn; the option is the assistant reply."""

    tokenizer: Any
    system: str | None = None

    def __post_init__(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer {type(self.tokenizer).__name__} has no chat_template; use 'direct'")

    def prompt(self, input: str, demonstrations: Sequence[Example] = ()) -> str:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for d in demonstrations:
            messages += [{"role": "user", "content": d.input}, {"role": "assistant", "content": d.target_text}]
        messages.append({"role": "user", "content": input})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def continuation(self, option: str) -> str:
        return option


def make_template(name: str | Template, tokenizer: Any = None) -> Template:
    """``"direct"`` -> :class:`DirectTemplate`, ``"chat"`` -> :class:`ChatTemplate` (``tokenizer``'s);
    a template object is returned as is."""
    if not isinstance(name, str):
        return name
    if name == "direct":
        return DirectTemplate()
    if name == "chat":
        return ChatTemplate(tokenizer)
    raise ValueError(f"unknown template {name!r}; choose 'direct', 'chat' or pass a Template object")
