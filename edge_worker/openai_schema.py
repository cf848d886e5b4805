"""The OpenAI request bodies the server accepts, and the error shape it answers with.

Every field a client may send is declared here. A field we do not implement is refused with a
400 that names it, never silently ignored; a field whose value changes nothing (``n: 1``,
``presence_penalty: 0``, ``logprobs: false``, ...) is accepted, because common clients send those
defaults on every request.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge_worker.engine import GenerationParams

MAX_STOP_STRINGS = 4  # OpenAI's limit


class APIError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unsupported(param: str, why: str = "") -> APIError:
    return APIError(400, f"'{param}' is not supported by this server{': ' + why if why else ''}",
                    param=param, code="unsupported_parameter")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


# Fields accepted only at the value that changes nothing: name -> that value's test.
_NEUTRAL = {
    "n": lambda v: v in (None, 1),
    "best_of": lambda v: v in (None, 1),
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "logprobs": lambda v: v in (None, False),
    "top_logprobs": lambda v: v in (None, 0),
    "logit_bias": lambda v: not v,
    "echo": lambda v: v in (None, False),
    "suffix": lambda v: not v,
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: True,  # meaningless without tools
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "store": lambda v: v in (None, False),
    "metadata": lambda v: True,  # bookkeeping for the caller; nothing to honour
    "user": lambda v: True,  # an end-user id for abuse tracking; nothing to honour
}


class CompletionBase(BaseModel):
    """What both endpoints take. Unknown fields are refused (``extra="forbid"``)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)  # an extension (llama.cpp and vLLM take it too)
    min_p: float | None = Field(None, ge=0.0, le=1.0)  # an extension, as in vLLM and llama.cpp
    # An extension, as in vLLM, over the generated tokens only (the prompt's ids stay on the device).
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False  # an extension (vLLM's): always generate max_tokens, for benchmarks
    # An extension, as in vLLM: keep only the prompt's last k tokens.
    truncate_prompt_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what the wire's integers carry
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted at their neutral values only (see _NEUTRAL).
    n: int | None = None
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return [s for s in stops if s]

    @model_validator(mode="after")
    def _neutral_only(self) -> CompletionBase:
        for name, neutral in _NEUTRAL.items():
            if name in type(self).model_fields and not neutral(getattr(self, name)):
                raise unsupported(name, f"only its default is accepted, got {getattr(self, name)!r}")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options needs stream: true", param="stream_options")
        return self

    def limit(self) -> int | None:
        return self.max_tokens

    def params(self, defaults: GenerationParams, raw_prompt: bool, seed: int) -> GenerationParams:
        """This request's GenerationParams: what it sets, the server's defaults for the rest."""
        return GenerationParams(
            max_new_tokens=self.limit() or defaults.max_new_tokens,
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            top_k=defaults.top_k if self.top_k is None else self.top_k,
            min_p=defaults.min_p if self.min_p is None else self.min_p,
            repetition_penalty=(defaults.repetition_penalty if self.repetition_penalty is None
                                else self.repetition_penalty),
            seed=seed, raw_prompt=raw_prompt, stop=tuple(self.stop or defaults.stop), ignore_eos=self.ignore_eos,
            truncate_prompt=defaults.truncate_prompt,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(CompletionBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(CompletionBase):
    prompt: str | list[str] | list[int]
    echo: bool | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str] | list[int]) -> str | list[int]:
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("one prompt per request (a list of several prompts is a batch, not supported)")
            return v[0]
        if isinstance(v, list) and not v:
            raise ValueError("the prompt is empty")
        return v
