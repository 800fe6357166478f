"""Chat templates from GGUF metadata, including VLM templates that want typed content."""

from __future__ import annotations

import pytest

from models.templates import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError

# The shape of SmolVLM's template: it walks ``content`` as a list of typed parts and
# would print nothing for a plain string.
TYPED_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def test_plain_template_gets_string_content() -> None:
    t = ChatTemplate(CHATML_TEMPLATE)
    assert t.typed_content is False
    out = t.render([{"role": "user", "content": "hello"}])
    assert out == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_typed_content_template_still_sees_the_text_and_image_markers() -> None:
    t = ChatTemplate(TYPED_TEMPLATE)
    assert t.typed_content is True
    out = t.render([{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "<__media__>\nWhat is on the gauge?"}])
    assert "Be brief." in out and "<__media__>\nWhat is on the gauge?" in out
    assert out.endswith("Assistant:")


def test_template_errors_are_chat_template_errors() -> None:
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% for %}")
    t = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="alternate"):
        t.render([{"role": "user", "content": "x"}])
