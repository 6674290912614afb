"""OpenAI request schemas (pydantic v2) and the one request -> SamplingParams translation.

The schemas are the contract and nothing else: they check shapes and ranges; limits that depend
on the model (the context length) are the server's business (``generation.completion_budget``).
Unknown fields are accepted and logged as ignored, never fatal: clients such as NextChat send
fields a local model has no use for. Known fields are strict, as OpenAI's API is: ``"stream":
"yes"``, ``"max_tokens": "10"`` or ``"n": 2.0`` are 400s, not silently coerced (an integer is
still a valid number for float fields such as ``temperature``).

Structured outputs and tools (``response_format``, ``tools``, ``tool_choice``, the legacy
``functions`` / ``function_call``) are typed here too; what grammar they need is decided once, in
``ChatCompletionRequest.grammar_spec``, and handed to ``to_sampling_params`` compiled.
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from llama_lab.defaults import DEFAULTS
from llama_lab.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from llama_lab.engine.grammar import CompiledGrammar, GrammarSpec
    from llama_lab.model.chat import ToolFormat

logger = logging.getLogger(__name__)


def _replace_lone_surrogates(value: Any) -> Any:
    """JSON may carry lone surrogates (``"\\ud800"``); tokenizers reject them, so they become U+FFFD."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if isinstance(value, list):
        return [_replace_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {k: _replace_lone_surrogates(v) for k, v in value.items()}
    return value


# Unknown fields are kept (and ignored); known ones are never coerced from another JSON type.
_CONTRACT = ConfigDict(extra="allow", strict=True)


class _Body(BaseModel):
    model_config = _CONTRACT

    @model_validator(mode="before")
    @classmethod
    def _clean_text(cls, data: Any) -> Any:
        return _replace_lone_surrogates(data)


class GenerationRequest(_Body):
    """Fields shared by chat and text completions."""

    model: str | None = None
    stream: bool = False
    stream_options: "StreamOptions | None" = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # vLLM's and llama.cpp's extension: decode exactly max_tokens (benchmarks)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        """OpenAI's shape: token ids as strings, biases in [-100, 100]; ids beyond the vocabulary are the server's check."""
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (as strings); got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {key} must be between -100 and 100; got {bias}")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        return stops

    def ignored_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def wants_logprobs(self) -> tuple[bool, int]:
        return False, 0

    def bias_pairs(self) -> list[tuple[int, float]]:
        return [(int(k), float(v)) for k, v in (self.logit_bias or {}).items()]

    def grammar_spec(self, tool_format: "ToolFormat | None" = None) -> "tuple[GrammarSpec, str] | None":
        """The grammar this request's output must follow and the request field it comes from; None: free text."""
        return None

    def to_sampling_params(self, *, max_tokens: int, defaults: "Defaults", index: int = 0,
                           grammar: "CompiledGrammar | None" = None) -> SamplingParams:
        """The only place where request fields become generation parameters.

        ``max_tokens`` is the budget the server computed (the request's own, or the default cut
        to the room left in the context). ``presence_penalty`` / ``frequency_penalty`` follow
        OpenAI's definition exactly (logit -= presence * [count > 0] + frequency * count, over
        generated tokens); ``repetition_penalty`` is Hugging Face's multiplicative penalty over
        prompt and output. With ``n > 1`` each choice gets ``seed + index`` so choices differ but
        stay reproducible. ``grammar`` is ``grammar_spec()`` compiled (off the event loop, cached).
        """
        logprobs, top = self.wants_logprobs()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature if self.temperature is not None else defaults.temperature,
            top_p=self.top_p if self.top_p is not None else defaults.top_p,
            top_k=self.top_k or 0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=None if self.seed is None else self.seed + index,
            stop=tuple(self.stop or ()),
            logprobs=logprobs,
            top_logprobs=top,
            logit_bias=tuple(self.bias_pairs()),
            grammar=grammar,
            ignore_eos=self.ignore_eos,
        )


class Defaults(BaseModel):
    """Server-side defaults for fields a request leaves out (the settings set them; values from ``DEFAULTS``)."""

    max_tokens: int = DEFAULTS.max_tokens
    temperature: float = DEFAULTS.temperature
    top_p: float = DEFAULTS.top_p


class StreamOptions(BaseModel):
    model_config = _CONTRACT
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = _CONTRACT
    type: str = "text"
    text: str | None = None


_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _check_function_name(value: str) -> str:
    if not _FUNCTION_NAME.match(value):
        raise ValueError(f"function names are 1-64 letters, digits, '_' or '-'; got {value!r}")
    return value


def _check_arguments(value: str) -> str:
    """A call's ``arguments`` must be a JSON object, as the model will read them back."""
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise ValueError(f"arguments must be a JSON object encoded as a string: {exc}") from None
    if not isinstance(parsed, dict):
        raise ValueError("arguments must be a JSON object encoded as a string")
    return value


class FunctionCall(BaseModel):
    """A call the model made: what an assistant message carries back in the history."""

    model_config = _CONTRACT
    name: str
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _json_arguments(cls, value: str) -> str:
        return _check_arguments(value)


class ToolCall(BaseModel):
    model_config = _CONTRACT
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    """A function the model may call; ``parameters`` is a JSON schema (an empty object when absent)."""

    model_config = _CONTRACT
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _check_function_name(value)

    def parameters_schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters else {"type": "object", "properties": {}}


class Tool(BaseModel):
    model_config = _CONTRACT
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = _CONTRACT
    name: str


class NamedToolChoice(BaseModel):
    model_config = _CONTRACT
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``text``, ``json_object`` (any JSON object) or ``json_schema`` (that schema); all but text are enforced by a grammar."""

    model_config = _CONTRACT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object with a 'name' and a 'schema'")
        return self


class ChatMessage(BaseModel):
    model_config = _CONTRACT
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    tool_call_id: str | None = None
    # declared after role and tool calls so its validator can read them; validated when absent too
    content: str | list[ContentPart] | None = Field(None, validate_default=True)
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content_required(cls, value: Any, info: ValidationInfo) -> Any:
        """OpenAI lets only an assistant message that calls tools leave ``content`` out or null."""
        if value is None:
            data = info.data
            if "role" not in data:  # the role itself was invalid: that error is the one to report
                return value
            if not (data["role"] == "assistant" and (data.get("tool_calls") or data.get("function_call"))):
                raise PydanticCustomError("content_required",
                                          "a {role} message needs 'content' (a string or a list of content parts); "
                                          "only an assistant message with tool_calls may leave it out",
                                          {"role": data["role"]})
        return value

    def as_template_message(self) -> dict[str, Any]:
        """The message as chat templates read it: Hugging Face's shape for tool calls (arguments as a dict)."""
        from llama_lab.model.chat import message_text

        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": message_text(
            [p.model_dump() for p in self.content] if isinstance(self.content, list) else self.content)}
        calls = list(self.tool_calls or [])
        if self.function_call is not None:
            calls.append(ToolCall(id="call_legacy", function=self.function_call))
        if calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                                 for c in calls]
        if role in ("tool", "function"):
            out["role"] = "tool"
            if self.tool_call_id is not None:
                out["tool_call_id"] = self.tool_call_id
            if self.name is not None:
                out["name"] = self.name
        return out


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = None  # legacy: tools without the wrapper
    function_call: Literal["none", "auto"] | NamedFunction | None = None

    @model_validator(mode="after")
    def _check_tools(self) -> "ChatCompletionRequest":
        """A named choice must name a declared function; tools and legacy functions do not mix."""
        if self.tools and self.functions:
            raise PydanticCustomError("tools_and_functions", "send either 'tools' or the legacy 'functions', not both")
        names = [f.name for f in self.function_definitions()]
        if len(set(names)) != len(names):
            raise PydanticCustomError("duplicate_function", "function names must be unique")
        return self

    def legacy_functions(self) -> bool:
        """The request used ``functions``: the answer carries ``function_call`` instead of ``tool_calls``."""
        return bool(self.functions) and not self.tools

    def function_definitions(self) -> list[FunctionDefinition]:
        if self.tools:
            return [t.function for t in self.tools]
        return list(self.functions or [])

    def tool_mode(self) -> tuple[str, str | None]:
        """``(mode, name)``: ``none`` (no tools shown or parsed), ``auto``, ``required`` or ``named``."""
        functions = self.function_definitions()
        choice: Any = self.function_call if self.legacy_functions() else self.tool_choice
        if not functions:
            if isinstance(choice, NamedToolChoice | NamedFunction) or choice == "required":
                field = "function_call" if self.functions is not None and not self.tools else "tool_choice"
                raise ValueError(f"'{field}' asks for a tool call but no tools were given")
            return "none", None
        if choice is None or choice == "auto":
            return "auto", None
        if choice == "none" or choice == "required":
            return choice, None
        name = choice.function.name if isinstance(choice, NamedToolChoice) else choice.name
        if name not in {f.name for f in functions}:
            raise ValueError(f"'{name}' is not one of the functions given in "
                             f"'{'functions' if self.legacy_functions() else 'tools'}': "
                             f"{', '.join(f.name for f in functions)}")
        return "named", name

    def tool_choice_param(self) -> str:
        return "function_call" if self.legacy_functions() else "tool_choice"

    def allows_parallel_calls(self) -> bool:
        return self.parallel_tool_calls is not False and not self.legacy_functions()

    def grammar_spec(self, tool_format: "ToolFormat | None" = None) -> "tuple[GrammarSpec, str] | None":
        """The grammar for ``response_format`` and forced tool calls, with the field it comes from.

        ``required`` / a named function: the model must write calls in its template's format with
        arguments valid for the function's parameters. ``auto`` with a ``response_format``: either
        calls or the formatted answer. ``auto`` alone: free text, parsed for calls afterwards.
        """
        from llama_lab.engine.grammar import GrammarSpec
        from llama_lab.model.chat import tool_call_grammar

        mode, name = self.tool_mode()
        answer = self._answer_schema()
        if mode in ("required", "named"):
            functions = [f for f in self.function_definitions() if name is None or f.name == name]
            assert tool_format is not None
            lark = tool_call_grammar(tool_format, [(f.name, f.parameters_schema()) for f in functions],
                                     parallel=self.allows_parallel_calls())
            return GrammarSpec.lark(lark), "tools" if name is None else self.tool_choice_param()
        if mode == "auto" and answer is not None and tool_format is not None:
            lark = tool_call_grammar(tool_format, [(f.name, f.parameters_schema()) for f in self.function_definitions()],
                                     parallel=self.allows_parallel_calls(), or_answer=answer)
            return GrammarSpec.lark(lark), "response_format"
        if answer is not None:
            return GrammarSpec.json_schema(answer), "response_format"
        return None

    def _answer_schema(self) -> dict[str, Any] | None:
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"type": "object"}
        assert fmt.json_schema is not None
        return fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {"type": "object"}

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def wants_logprobs(self) -> tuple[bool, int]:
        return self.logprobs, (self.top_logprobs or 0) if self.logprobs else 0

    @model_validator(mode="after")
    def _check_top_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    def wants_logprobs(self) -> tuple[bool, int]:
        return (self.logprobs is not None), (self.logprobs or 0)

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        return _split_inputs(self.prompt)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        return _require_non_empty(value, "the prompt is empty")


class TokenizeRequest(ChatCompletionRequest):
    """``POST /tokenize``: a chat request's messages (with its tools), or a text prompt, counted exactly as
    the same request to ``/v1/chat/completions`` or ``/v1/completions`` would be (vLLM's route and shape).

    The other fields of a generation request are accepted and ignored, so a gateway can send the body
    it is about to forward.
    """

    messages: list[ChatMessage] | None = Field(None, min_length=1)  # type: ignore[assignment]
    prompt: str | list[int] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.messages is None) == (self.prompt is None):
            raise PydanticCustomError("tokenize_input", "send either 'messages' or 'prompt' (one text or one list of token ids)")
        if self.prompt is not None and not self.prompt:
            raise PydanticCustomError("tokenize_input", "the prompt is empty")
        return self


class EmbeddingRequest(_Body):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        """One entry per input: text, or token ids."""
        return _split_inputs(self.input)

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        return _require_non_empty(value, "the input is empty")


def _split_inputs(value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """OpenAI's four shapes (text, texts, ids, lists of ids) as one list of prompts."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(x, int) for x in value):
        return [list(value)]  # type: ignore[arg-type]
    return list(value)  # type: ignore[arg-type]


def _require_non_empty(value: Any, message: str) -> Any:
    if value == "" or value == [] or value == [""]:
        raise ValueError(message)
    return value


GenerationRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
