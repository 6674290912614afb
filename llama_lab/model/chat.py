"""Chat prompts and stop tokens, both derived from the tokenizer's own chat template.

Stopping only on ``eos_token_id`` gives endless output on Llama-3, whose turns end with
``<|eot_id|>``. So the stop set is the union of the tokenizer's eos, the generation config's eos
ids and the end-of-turn token the template actually writes, and no model needs hand edits.
"""

from __future__ import annotations

import dataclasses
import json
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


# ---------------------------------------------------------------- tools


@dataclasses.dataclass(frozen=True)
class ToolFormat:
    """How a model family writes tool calls and how its template shows tools.

    ``native``: the model's own template renders ``tools``, assistant ``tool_calls`` and ``tool``
    results. Otherwise the generic prompt (``GENERIC_TOOL_PROMPT``) is added to the system message,
    calls in the history are written back as the model would write them, and results become user
    turns in ``<tool_response>`` tags.
    """

    name: str
    native: bool
    call_start: str  # the text that opens one call ("" : the whole answer is the call's JSON)
    call_end: str
    arguments_key: str  # "arguments" (Hermes / Qwen2.5, generic) or "parameters" (Llama 3.1/3.2)


TOOL_FORMATS = {
    "hermes": ToolFormat("hermes", True, "<tool_call>\n", "\n</tool_call>", "arguments"),
    "llama3_json": ToolFormat("llama3_json", True, "", "", "parameters"),
    "generic": ToolFormat("generic", False, "<tool_call>\n", "\n</tool_call>", "arguments"),
}

GENERIC_TOOL_PROMPT = (
    "You can call functions. Here they are, as JSON schemas:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with one block per call, each holding a JSON object with the function's "
    "name and its arguments:\n<tool_call>\n{{\"name\": \"<function name>\", \"arguments\": {{<arguments>}}}}\n</tool_call>\n"
    "Function results come back in <tool_response></tool_response> blocks. Answer in plain text when no call is needed."
)


def tool_format(tokenizer: Any) -> ToolFormat:
    """Which tool format the model's template speaks: Hermes tags, Llama 3's JSON, or the generic prompt."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str) or "tools" not in template:
        return TOOL_FORMATS["generic"]
    if "<tool_call>" in template:
        return TOOL_FORMATS["hermes"]
    if "<|python_tag|>" in template or "ipython" in template:
        return TOOL_FORMATS["llama3_json"]
    return TOOL_FORMATS["generic"]


def _call_text(fmt: ToolFormat, call: dict[str, Any]) -> str:
    function = call.get("function", call)
    args = function.get("arguments", {})
    body = json.dumps({"name": function["name"], fmt.arguments_key: args}, ensure_ascii=False)
    return f"{fmt.call_start}{body}{fmt.call_end}"


def _generic_messages(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None,
                      fmt: ToolFormat) -> list[dict[str, str]]:
    """Plain role/content messages for a template that knows nothing of tools."""
    out: list[dict[str, str]] = []
    for m in messages:
        content = message_text(m.get("content"))
        if m.get("tool_calls"):
            calls = "\n".join(_call_text(fmt, c) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": f"{content}\n{calls}" if content else calls})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": str(m["role"]), "content": content})
    if tools:
        prompt = GENERIC_TOOL_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False, separators=(",", ":"))
                                                            for t in tools))  # compact: as the gateway counts it
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def render_tool_chat(tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                     add_generation_prompt: bool = True) -> str:
    """The prompt for a conversation that may declare tools or carry calls and results.

    ``messages`` are Hugging Face's shape (``tool_calls`` with arguments as dicts, ``tool`` role
    with ``tool_call_id``); ``tools`` are OpenAI's tool objects, shown to the model only when given.
    """
    fmt = tool_format(tokenizer)
    has_tool_turns = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if not tools and not has_tool_turns:
        return render_chat(tokenizer, normalize_messages(messages), add_generation_prompt)
    if fmt.native:
        template = tokenizer.chat_template
        return tokenizer.apply_chat_template(list(messages), tools=list(tools) if tools else None,
                                             chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return render_chat(tokenizer, _generic_messages(messages, tools, fmt), add_generation_prompt)


def tool_call_grammar(fmt: ToolFormat, functions: Sequence[tuple[str, dict[str, Any]]], *, parallel: bool,
                      or_answer: dict[str, Any] | None = None) -> str:
    """A Lark grammar (llguidance's dialect, JSON schemas inline) for calls in ``fmt``.

    Each call is one of ``functions`` with arguments valid for its parameters; several calls when
    ``parallel`` (the Llama 3 JSON format allows one). ``or_answer``: a JSON schema the answer
    may follow instead of calling.
    """
    call_schema = {"anyOf": [
        {"type": "object", "properties": {"name": {"const": name}, fmt.arguments_key: params},
         "required": ["name", fmt.arguments_key], "additionalProperties": False}
        for name, params in functions]}
    compact = {"x-guidance": {"whitespace_flexible": False}}  # no runs of spaces from a model that is unsure
    schema = json.dumps({**(call_schema if len(functions) > 1 else call_schema["anyOf"][0]), **compact})
    call = f"{json.dumps(fmt.call_start)} %json{schema} {json.dumps(fmt.call_end)}" if fmt.call_start else f"%json{schema}"
    calls = "call (\"\\n\" call)*" if parallel and fmt.call_start else "call"
    start = f"start: {calls}"
    if or_answer is not None:
        start += f" | %json{json.dumps({**or_answer, **compact})}"
    return f"{start}\ncall: {call}\n"
