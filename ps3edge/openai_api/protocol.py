"""The chat-completions protocol: the request's fields (pydantic, unknown ones refused), checked
into what the pipeline takes (a conversation, its one image, sampling, stop strings, look-close
settings), and the response, chunk and error objects the OpenAI API defines.

Fields are in three groups: the ones used (model, messages, stream, stream_options, max_tokens /
max_completion_tokens, temperature, top_p, seed, stop, n = 1, and the five look-close settings
as extra fields); OpenAI's that change nothing here and are accepted and ignored (IGNORED); and
OpenAI's that would change the answer in a way this server cannot, accepted only at their no-op
value (NO_OP). Any other name is refused with 400, as `ps3edge serve` refuses an unknown
parameter: the openai client sends only the fields set, so a misspelt extra field is a mistake.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from .. import defaults
from ..errors import Ps3EdgeError
from ..llm.generate import SamplingConfig
from ..serve.settings import LOOK_CLOSE_PARAMETERS

SEED_MAX = defaults.SEED_MAX
IGNORED = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
           "parallel_tool_calls", "reasoning_effort", "verbosity")
NO_OP = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "top_logprobs": 0,
         "logit_bias": {}, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
         "modalities": ["text"]}


class ApiError(Exception):
    """An error answered as the OpenAI API's error object, with its HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param, "invalid_value" if param else None)


# --- the request -----------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: StrictStr
    detail: Optional[Literal["auto", "low", "high"]] = None       # accepted; the look-close settings decide


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[Part]]
    name: Optional[StrictStr] = None                                # accepted, not shown to the model


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    include_obfuscation: Optional[StrictBool] = None                 # accepted; no obfuscation is added


LookCloseValue = Optional[Union[StrictInt, StrictStr]]


class ChatCompletionRequest(_Strict):
    model: StrictStr
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[StrictInt] = None
    max_completion_tokens: Optional[StrictInt] = None
    temperature: Optional[StrictFloat] = None
    top_p: Optional[StrictFloat] = None
    seed: Optional[StrictInt] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    n: Optional[StrictInt] = None
    # the look-close settings, as `ps3edge serve`'s request parameters
    num_look_close: LookCloseValue = None
    num_token_look_close: LookCloseValue = None
    select_num_each_scale: LookCloseValue = None
    look_close_mode: Optional[StrictStr] = None
    smooth_selection_prob: Optional[Union[StrictBool, StrictInt, StrictStr]] = None
    # OpenAI's fields that change nothing here
    user: Optional[StrictStr] = None
    metadata: Optional[dict[str, Any]] = None
    store: Optional[StrictBool] = None
    service_tier: Optional[StrictStr] = None
    safety_identifier: Optional[StrictStr] = None
    prompt_cache_key: Optional[StrictStr] = None
    parallel_tool_calls: Optional[StrictBool] = None
    reasoning_effort: Optional[StrictStr] = None
    verbosity: Optional[StrictStr] = None
    # OpenAI's fields taken at their no-op value only
    frequency_penalty: Optional[StrictFloat] = None
    presence_penalty: Optional[StrictFloat] = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = None
    logit_bias: Optional[dict[str, Any]] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Union[StrictStr, dict[str, Any]]] = None
    modalities: Optional[list[StrictStr]] = None


_TYPE_TAGS = re.compile(r"^(str|int|float|bool|list\[.*|dict\[.*|function-.*|tagged-union\[.*|literal\[.*|none)$")


def _param(loc) -> str:
    """pydantic's location of an error as the request field it names (union member tags dropped)."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and _TYPE_TAGS.match(p)))


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The JSON body, or a 400 naming the first field that is wrong (an unknown one included)."""
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as e:
        # the deepest error names the field best (a union reports each of its members' errors)
        first = max(e.errors(include_url=False), key=lambda err: len(err["loc"]))
        param = _param(first["loc"])
        if first["type"] == "json_invalid":
            raise bad_request(f"the request body is not valid JSON ({first['msg']})") from None
        if first["type"] == "model_type" and not param:
            raise bad_request("the request body must be a JSON object") from None
        if first["type"] == "extra_forbidden":
            raise bad_request(f"unknown field '{param}' (docs/openai-api.md lists the fields this server takes)",
                              param) from None
        if first["type"] == "missing":
            raise bad_request(f"'{param}' is required", param) from None
        raise bad_request(f"{param}: {first['msg']}", param) from None


@dataclass(frozen=True)
class Conversation:
    """What the pipeline takes: the turns as text, which one holds the image, and its URL."""
    turns: list
    image_message: int
    image_url: str


def conversation(request: ChatCompletionRequest) -> Conversation:
    """The messages as text turns with exactly one image, in a user message. A message's text
    parts are joined with newlines; the image goes in front of its message's text (VILA's order),
    wherever its part is."""
    turns, images = [], []
    for i, message in enumerate(request.messages):
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        texts = [p.text for p in parts if isinstance(p, TextPart)]
        for j, part in enumerate(parts):
            if isinstance(part, ImagePart):
                if message.role != "user":
                    raise bad_request(f"only a user message may carry the image (message {i} is {message.role}'s)",
                                      f"messages.{i}.content.{j}")
                images.append((i, part.image_url.url))
        role = "system" if message.role == "developer" else message.role
        turns.append({"role": role, "content": "\n".join(texts)})
    if len(images) != 1:
        raise bad_request(f"this model answers about exactly one image per request; the messages hold {len(images)} "
                          f"image_url parts", "messages")
    if request.messages[-1].role != "user":
        raise bad_request("the last message must be the user's: the model answers it", "messages")
    if not turns[-1]["content"].strip():
        raise bad_request("the last user message has no text: ask a question about the image", "messages")
    return Conversation(turns, images[0][0], images[0][1])


def check_no_ops(request: ChatCompletionRequest) -> None:
    """OpenAI's fields this server cannot honour, refused unless at the value that changes nothing."""
    for name, neutral in NO_OP.items():
        value = getattr(request, name)
        if value is None or value == neutral or (name == "tools" and not value) or (name == "logit_bias" and not value):
            continue
        raise bad_request(f"{name} is not supported by this server (only {neutral!r} or leaving it out)", name)


def sampling(request: ChatCompletionRequest) -> SamplingConfig:
    """max_tokens / max_completion_tokens, temperature, top_p and seed as `chat`'s sampling."""
    if request.n not in (None, 1):
        raise bad_request(f"n must be 1: this server gives one answer per request, got {request.n}", "n")
    given = {k: v for k, v in (("max_tokens", request.max_tokens),
                               ("max_completion_tokens", request.max_completion_tokens)) if v is not None}
    if len(set(given.values())) > 1:
        raise bad_request("max_tokens and max_completion_tokens differ; give one", "max_completion_tokens")
    max_tokens = next(iter(given.values()), defaults.OPENAI_MAX_TOKENS)
    seed = request.seed if request.seed is not None else secrets.randbelow(SEED_MAX)   # none: as OpenAI, unrepeatable
    if not 0 <= seed <= SEED_MAX:
        raise bad_request(f"seed must be between 0 and {SEED_MAX}, got {seed}", "seed")
    config = SamplingConfig(max_new_tokens=max_tokens,
                            temperature=defaults.OPENAI_TEMPERATURE if request.temperature is None else request.temperature,
                            top_p=1.0 if request.top_p is None else request.top_p, seed=seed)
    try:
        return config.validate()
    except Ps3EdgeError as e:
        param = next(iter(given), "max_tokens") if "max new tokens" in str(e) else \
            "temperature" if "temperature" in str(e) else "top_p"
        raise bad_request(str(e).replace("max new tokens", param), param) from None


def stop_strings(request: ChatCompletionRequest) -> tuple[str, ...]:
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > defaults.OPENAI_MAX_STOP_STRINGS:
        raise bad_request(f"stop takes at most {defaults.OPENAI_MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise bad_request("a stop string is empty", "stop")
    return tuple(stops)


def look_close_param(request: ChatCompletionRequest, message: str) -> Optional[str]:
    """The look-close field a refusal names (its environment variable's name, as `run` says it)."""
    return next((name for name in look_close_parameters(request) if name.upper() in message), None)


def look_close_parameters(request: ChatCompletionRequest) -> dict:
    """The look-close fields given, by `ps3edge serve`'s parameter names (serve/settings.py checks them)."""
    return {name: getattr(request, name) for name in LOOK_CLOSE_PARAMETERS if getattr(request, name) is not None}


# --- the response ----------------------------------------------------------------------------

FINISH = {"stop_token": "stop", "stopped": "stop", "max_new_tokens": "length"}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, created: int, model: str, text: str, finish: str, use: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish}], "usage": use}


def chunk(cid: str, created: int, model: str, delta: Optional[dict] = None, finish: Optional[str] = None,
          use: Optional[dict] = None) -> dict:
    """A chat.completion.chunk: a delta, the finish reason, or (choices empty) the usage."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "ps3edge"}


def now() -> int:
    return int(time.time())
