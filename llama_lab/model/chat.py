"""Chat prompts and stop tokens, both derived from the tokenizer's own chat template.

The seed's "endless output" bug came from stopping only on ``eos_token_id`` while Llama-3
turns end with ``<|eot_id|>``. Here the stop set is the union of the tokenizer's eos, the
generation config's eos ids and the end-of-turn token the template actually writes, so no
model needs hand edits.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

logger = logging.getLogger(__name__)

# Used only for models that ship no chat template (base models).
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

_MARK = "\u2063llama_lab_turn_end\u2063"


def message_text(content: Any) -> str:
    """Flatten OpenAI content (a string or a list of parts) into text; image parts are dropped."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, dict):
            if part.get("type", "text") == "text":
                parts.append(str(part.get("text", "")))
        else:
            text = getattr(part, "text", None)
            if text is not None:
                parts.append(str(text))
    return "".join(parts)


def normalize_messages(messages: Iterable[Any]) -> list[dict[str, str]]:
    """Plain ``{"role", "content"}`` dicts, whatever shape (dicts or pydantic models) came in."""
    out = []
    for m in messages:
        if hasattr(m, "model_dump"):
            m = m.model_dump()
        out.append({"role": str(m["role"]), "content": message_text(m.get("content"))})
    return out


def render_chat(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt text exactly as the model was trained to see it."""
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def template_turn_end_ids(tokenizer: Any) -> set[int]:
    """The special token(s) the template writes right after an assistant message's content."""
    if not getattr(tokenizer, "chat_template", None):
        return set()
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}]
    try:
        text = render_chat(tokenizer, convo, add_generation_prompt=False)
    except Exception as exc:  # templates can reject odd conversations; fall back to eos only
        logger.warning("could not render the chat template to find its end-of-turn token: %s", exc)
        return set()
    tail = text.split(_MARK, 1)[-1] if _MARK in text else ""
    ids = tokenizer.encode(tail, add_special_tokens=False) if tail.strip() else []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for tid in ids:
        if tid in special or tid in added:
            return {int(tid)}
        if tokenizer.decode([tid]).strip():
            break  # the first visible token after the content is not a special marker
    return set()


def resolve_stop_ids(tokenizer: Any, generation_config: Any | None) -> frozenset[int]:
    """Union of every id that can end an assistant turn for this model."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    ids |= template_turn_end_ids(tokenizer)
    return frozenset(ids)
