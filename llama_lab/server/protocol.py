"""OpenAI request schemas (pydantic v2) and the one request -> SamplingParams translation.

The schemas are the contract and nothing else: they check shapes and ranges; limits that depend
on the model (the context length) are the server's business (``generation.completion_budget``).
Unknown fields are accepted and logged as ignored, never fatal: clients such as NextChat send
fields a local model has no use for. Known fields are strict, as OpenAI's API is: ``"stream":
"yes"``, ``"max_tokens": "10"`` or ``"n": 2.0`` are 400s, not silently coerced (an integer is
still a valid number for float fields such as ``temperature``).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from llama_lab.engine.sampling import SamplingParams

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

    def to_sampling_params(self, *, max_tokens: int, defaults: "Defaults", index: int = 0) -> SamplingParams:
        """The only place where request fields become generation parameters.

        ``max_tokens`` is the budget the server computed (the request's own, or the default cut
        to the room left in the context). ``presence_penalty`` / ``frequency_penalty`` follow
        OpenAI's definition exactly (logit -= presence * [count > 0] + frequency * count, over
        generated tokens); ``repetition_penalty`` is Hugging Face's multiplicative penalty over
        prompt and output. With ``n > 1`` each choice gets ``seed + index`` so choices differ but
        stay reproducible.
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
        )


class Defaults(BaseModel):
    """Server-side defaults for fields a request leaves out."""

    max_tokens: int = 2048
    temperature: float = 0.7
    top_p: float = 0.9


class StreamOptions(BaseModel):
    model_config = _CONTRACT
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = _CONTRACT
    type: str = "text"
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = _CONTRACT
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    tool_calls: list[Any] | None = None
    function_call: Any = None
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
        from llama_lab.model.chat import message_text

        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": message_text([p.model_dump() for p in self.content] if isinstance(self.content, list) else self.content)}


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

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
