"""Pydantic models of the HTTP API: the OpenAI request/response types this server speaks, and its
own /generate and /reload.

Requests are strict (no "5" for 5, no true for 1.0): a wrong type is the client's mistake and gets
a 400 naming the field. Unknown fields are ignored on the OpenAI routes (its clients send many
optional ones), refused on the server's own routes. Ranges are checked in api.params, with messages
that name the parameter.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _NativeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_OpenAIRequest):
    include_usage: bool = False


class SamplingRequest(_OpenAIRequest):
    """Fields /v1/completions and /v1/chat/completions share."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = Field(None, description="extension: sample among the k most likely tokens (0 or -1: off)")
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = Field(None, description="extension: token ids that end generation")
    ignore_eos: bool = Field(False, description="extension: do not stop at the model's EOS token")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    # Accepted so OpenAI clients that send their defaults work; anything but the default is refused.
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class ContentPart(_OpenAIRequest):
    type: str
    text: Optional[str] = None


class ChatMessage(_OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None


class GenerateRequest(_NativeRequest):
    """POST /generate: a prompt (plain text, encoded with the tokenizer's special tokens, or ids)."""

    prompt: Union[str, list[int]]
    max_tokens: int = 16
    temperature: float = Field(0.0, description="0 is greedy (the default here)")
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False


class ReloadRequest(_NativeRequest):
    path: str
    version: str
    drain_timeout_s: Optional[float] = None


# -------------------------------------------------------------------------------------------
# Responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Choice(BaseModel):
    """What every choice carries; the subclasses add the text in their endpoint's shape."""
    index: int = 0
    logprobs: None = None
    finish_reason: Optional[str] = None


class _Response(BaseModel):
    """What every response and stream chunk carries besides its object name and choices."""
    id: str
    created: int
    model: str


class CompletionChoice(_Choice):
    text: str


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(_Choice):
    delta: ChatDelta


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionChunk(CompletionResponse):
    """A streamed completion chunk has the whole response's shape (OpenAI sends both alike)."""


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "graphserver"
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class GenerateResponse(BaseModel):
    text: str
    tokens: list[int]
    finish_reason: Optional[str]
    usage: Usage
    model_version: str


class ReloadResponse(BaseModel):
    model_version: str
    previous_version: str
    drain_ms: float
    copy_ms: float
