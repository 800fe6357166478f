"""Chat templates: the model's own Jinja template from its GGUF metadata.

Rendering happens in a sandbox because the template comes from a file the operator
downloaded, not from us.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used only when a GGUF carries no template at all (rare for instruct models).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered with this model's template."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return _dt.datetime.now().strftime(fmt)


@dataclass
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""

    def __post_init__(self) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(self.source)
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template does not compile: {exc}") from exc
        self.typed_content = self._wants_typed_content()

    def _wants_typed_content(self) -> bool:
        """Some VLM templates (SmolVLM's, for one) only read ``content`` as a list of
        typed parts and silently drop a plain string; detect that once with a probe."""
        probe = "edgevlm-template-probe"
        try:
            out = self._render([{"role": "user", "content": probe}], True, {})
        except Exception:
            out = ""
        if probe in out:
            return False
        try:
            typed = self._render([{"role": "user", "content": [{"type": "text", "text": probe}]}],
                                 True, {})
        except Exception:
            return False
        return probe in typed

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                extra: dict[str, Any]) -> str:
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **extra,
        )

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """Render messages whose ``content`` is already a string (images as markers)."""
        if self.typed_content:
            messages = [{**m, "content": [{"type": "text", "text": m.get("content") or ""}]}
                        for m in messages]
        try:
            return self._render(messages, add_generation_prompt, extra)
        except ChatTemplateError:
            raise
        except Exception as exc:  # a template from a GGUF can fail in any way (TypeError, ...)
            raise ChatTemplateError(f"chat template failed: {exc}") from exc


def model_template(model: Any) -> ChatTemplate:
    """The chat template a loaded GGUF carries (ChatML when it has none), with its BOS/EOS
    texts: how the engine renders prompts, for code that evaluates a model outside it."""
    import llama_cpp

    from models.llama_lib import meta_str, token_piece

    vocab = llama_cpp.llama_model_get_vocab(model)

    def text(token: int) -> str:
        return token_piece(vocab, token).decode("utf-8", errors="replace") if token >= 0 else ""

    return ChatTemplate(meta_str(model, "tokenizer.chat_template") or CHATML_TEMPLATE,
                        bos_token=text(int(llama_cpp.llama_vocab_bos(vocab))),
                        eos_token=text(int(llama_cpp.llama_vocab_eos(vocab))))
