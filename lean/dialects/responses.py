"""OpenAI Responses in (docs/protocol.md §1): a `POST /v1/responses` body as lean's chat body.

What needs state is the route's (`lean.responses_route`): `previous_response_id` is handed
back to it (it sends the saved chain first), and `store` says whether it saves this answer.
`parse_request` turns the rest into the OpenAI Chat Completions shape every provider
adapter takes:
- `instructions` becomes the first system message;
- `input` as a string is one user message; as items: `message` (its `input_text`,
  `input_image`, `input_file` with inline data, `output_text` and `refusal` parts; role
  `developer` sent as `system`, which every compatible server knows), `function_call`
  (a tool call of the assistant turn before it), `function_call_output` (a `tool`
  message), `custom_tool_call`/`_output` (as a function with one string argument
  `input`); `reasoning` items are left out (no Chat Completions upstream takes them back);
- function `tools` (Responses' flat shape nested as Chat Completions'), custom tools as
  functions taking `{"input": string}` (their names in `Request.custom_tools`, for the
  encoder to answer in kind), a `namespace`'s functions as functions (their namespace in
  `Request.namespaces`, for the encoder to name it on their calls; a name already taken
  is left out), `tool_choice`, `max_output_tokens` (as `max_tokens`),
  `reasoning.effort` (as `reasoning_effort`), `text.format` (as `response_format`),
  `temperature`, `top_p`, `user`, and `parallel_tool_calls` (with tools only).
Hosted tools (`web_search`, `file_search`, ...) have no Chat Completions form: they are
listed in `Request.untranslated`. What lean cannot serve statelessly (`item_reference`,
`conversation`, `background`, files by id) is a `BadRequest` naming the field; errors go
out in OpenAI's shape (`lean.errors.openai_error_body`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from lean.dialects.common import arguments, convert, invalid
from lean.inbound import ClientId, decode

__all__ = ["Request", "parse_request"]

Role = Literal["user", "assistant", "system", "developer"]


class _Reasoning(msgspec.Struct):
    effort: str | None = None
    summary: str | None = None


class _Text(msgspec.Struct):
    format: dict[str, Any] | None = None
    verbosity: str | None = None


class _Request(msgspec.Struct):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_output_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    reasoning: _Reasoning | None = None
    text: _Text | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: ClientId | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    background: bool | None = None
    conversation: Any = None
    metadata: dict[str, str] | None = None


# Input items and their parts, checked one by one once their `type` is known.
class _Typed(msgspec.Struct):
    type: str | None = None


class _Message(msgspec.Struct):
    role: Role
    content: str | list[dict[str, Any]]


class _FunctionCall(msgspec.Struct):
    call_id: ClientId
    name: Annotated[str, msgspec.Meta(min_length=1)]
    arguments: str


class _FunctionOutput(msgspec.Struct):
    call_id: ClientId
    output: str | list[dict[str, Any]]


class _CustomCall(msgspec.Struct):
    call_id: ClientId
    name: Annotated[str, msgspec.Meta(min_length=1)]
    input: str


class _TextPart(msgspec.Struct):
    text: str


class _RefusalPart(msgspec.Struct):
    refusal: str


class _ImagePart(msgspec.Struct):
    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None


class _FilePart(msgspec.Struct):
    file_data: str | None = None
    file_id: str | None = None
    file_url: str | None = None
    filename: str | None = None


class _FunctionTool(msgspec.Struct):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _Namespace(msgspec.Struct):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    tools: list[dict[str, Any]]


class _CustomTool(msgspec.Struct):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    description: str | None = None


class Request(msgspec.Struct, kw_only=True):
    """A checked Responses request: the chat body, and what the route must act on."""

    model: str
    stream: bool
    store: bool
    previous_response_id: str | None
    body: dict[str, Any]  # its messages: the instructions' (if any), then the input's
    instructions: bool  # the first message is the instructions (not saved: not carried on)
    untranslated: list[str]
    custom_tools: frozenset[str]
    namespaces: dict[str, str]  # a namespaced function's namespace, by its name
    echo: dict[str, Any]  # the settings a `response` object repeats, as the client gave them


_decode_request = msgspec.json.Decoder(_Request)

# A custom (free-form) tool's text, as the one argument of a function.
CUSTOM_PARAMETERS = {
    "type": "object",
    "properties": {"input": {"type": "string"}},
    "required": ["input"],
}
# Passed on as they are: Chat Completions has them under the same names, and compatible
# servers know them. `prompt_cache_key`, `safety_identifier`, `service_tier` and `include`
# are OpenAI's own and are not: a compatible server may refuse a field it does not know.
_PASSED = ("temperature", "top_p", "user")


def parse_request(body: bytes) -> Request:
    request = decode(_decode_request, body)
    if request.background:
        raise invalid("lean answers in the foreground only", "$.background")
    if request.conversation is not None:
        raise invalid("lean keeps no conversations: use previous_response_id", "$.conversation")
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    if isinstance(request.input, str):
        messages.append({"role": "user", "content": request.input})
    else:
        for i, item in enumerate(request.input):
            _item(item, f"$.input[{i}]", messages)
    chat: dict[str, Any] = {"model": request.model, "messages": messages}
    untranslated: list[str] = []
    tools, custom, namespaces = _tools(request.tools, untranslated)
    if tools:
        chat["tools"] = tools
        if request.tool_choice is not None:
            choice = _tool_choice(request.tool_choice, untranslated)
            if choice is not None:
                chat["tool_choice"] = choice
        if request.parallel_tool_calls is not None:  # refused without tools
            chat["parallel_tool_calls"] = request.parallel_tool_calls
    if request.max_output_tokens is not None:
        chat["max_tokens"] = request.max_output_tokens
    if request.reasoning is not None and request.reasoning.effort:
        chat["reasoning_effort"] = request.reasoning.effort
    if request.text is not None:
        _text(request.text, chat)
    for name in _PASSED:
        value = getattr(request, name)
        if value is not None:
            chat[name] = value
    return Request(
        model=request.model,
        stream=request.stream,
        store=request.store,
        previous_response_id=request.previous_response_id,
        body=chat,
        instructions=bool(request.instructions),
        untranslated=untranslated,
        custom_tools=frozenset(custom),
        namespaces=namespaces,
        echo=_echo(request),
    )


def _echo(request: _Request) -> dict[str, Any]:
    text = msgspec.to_builtins(request.text) if request.text else {"format": {"type": "text"}}
    return {
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "parallel_tool_calls": request.parallel_tool_calls is not False,
        "previous_response_id": request.previous_response_id,
        "reasoning": msgspec.to_builtins(request.reasoning) if request.reasoning else None,
        "store": request.store,
        "temperature": request.temperature,
        "text": text,
        "tool_choice": "auto" if request.tool_choice is None else request.tool_choice,
        "tools": request.tools or [],
        "top_p": request.top_p,
        "metadata": request.metadata or {},
    }


def _item(item: dict[str, Any], where: str, messages: list[dict[str, Any]]) -> None:
    kind = convert(item, _Typed, where).type
    if kind is None or kind == "message":
        message = convert(item, _Message, where)
        messages.append(_message(message, where))
    elif kind == "function_call":
        call = convert(item, _FunctionCall, where)
        _call(messages, call.call_id, call.name, call.arguments)
    elif kind == "custom_tool_call":
        custom = convert(item, _CustomCall, where)
        _call(messages, custom.call_id, custom.name, arguments({"input": custom.input}))
    elif kind in ("function_call_output", "custom_tool_call_output"):
        output = convert(item, _FunctionOutput, where)
        text = output.output
        if not isinstance(text, str):
            text = "\n".join(_texts(text, where + ".output"))
        messages.append({"role": "tool", "tool_call_id": output.call_id, "content": text})
    elif kind == "reasoning":
        pass  # the model's own reasoning: only the Responses API takes it back
    elif kind == "item_reference":
        raise invalid("lean keeps no items: send the item itself", where + ".type")
    else:
        raise invalid(f"lean cannot send an input item of type '{kind}'", where + ".type")


def _call(messages: list[dict[str, Any]], call_id: str, name: str, args: str) -> None:
    """A tool call joins the assistant turn it follows (a new one when there is none)."""
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
        if not last.get("content"):
            last["content"] = None
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _message(message: _Message, where: str) -> dict[str, Any]:
    role = "system" if message.role == "developer" else message.role
    if isinstance(message.content, str):
        return {"role": role, "content": message.content}
    parts: list[dict[str, Any]] = []
    refusal: list[str] = []
    for j, part in enumerate(message.content):
        place = f"{where}.content[{j}]"
        kind = convert(part, _Typed, place).type
        if kind in ("input_text", "output_text", "text", "summary_text"):
            parts.append({"type": "text", "text": convert(part, _TextPart, place).text})
        elif kind == "refusal":
            refusal.append(convert(part, _RefusalPart, place).refusal)
        elif kind == "input_image":
            parts.append(_image(convert(part, _ImagePart, place), place))
        elif kind == "input_file":
            parts.append(_file(convert(part, _FilePart, place), place))
        else:
            raise invalid(f"lean cannot send a content part of type '{kind}'", place + ".type")
    out: dict[str, Any] = {"role": role}
    if role != "user" and all(part["type"] == "text" for part in parts):
        out["content"] = "".join(part["text"] for part in parts)  # the shape every server takes
    elif len(parts) == 1 and parts[0]["type"] == "text":
        out["content"] = parts[0]["text"]
    else:
        out["content"] = parts
    if refusal:
        out["refusal"] = "".join(refusal)
    return out


def _texts(parts: list[dict[str, Any]], where: str) -> list[str]:
    out = []
    for k, part in enumerate(parts):
        place = f"{where}[{k}]"
        kind = convert(part, _Typed, place).type
        if kind not in ("input_text", "output_text", "text"):
            raise invalid("a tool's output may hold text only", place + ".type")
        out.append(convert(part, _TextPart, place).text)
    return out


def _image(image: _ImagePart, place: str) -> dict[str, Any]:
    if not image.image_url:
        raise invalid("lean keeps no files: send the image as `image_url`", place)
    url: dict[str, Any] = {"url": image.image_url}
    if image.detail:
        url["detail"] = image.detail
    return {"type": "image_url", "image_url": url}


def _file(file: _FilePart, place: str) -> dict[str, Any]:
    if not file.file_data:
        raise invalid("lean keeps no files: send the file as `file_data`", place)
    inner = {"file_data": file.file_data}
    if file.filename:
        inner["filename"] = file.filename
    return {"type": "file", "file": inner}


def _tools(
    tools: list[dict[str, Any]] | None, untranslated: list[str]
) -> tuple[list[dict[str, Any]], list[str], dict[str, str]]:
    """Chat Completions tools; the custom tools' names; each namespaced function's
    namespace, by its name (the upstream sees a namespace's functions as functions)."""
    out: list[dict[str, Any]] = []
    custom: list[str] = []
    namespaces: dict[str, str] = {}
    inner: list[tuple[str, dict[str, Any], str]] = []  # after the top-level names are known
    for i, tool in enumerate(tools or ()):
        where = f"$.tools[{i}]"
        kind = convert(tool, _Typed, where).type
        if kind == "function":
            function = _function(tool, where)
        elif kind == "custom":
            named = convert(tool, _CustomTool, where)
            custom.append(named.name)
            function = {"name": named.name, "parameters": CUSTOM_PARAMETERS}
            if named.description:
                function["description"] = named.description
        elif kind == "namespace":
            group = convert(tool, _Namespace, where)
            for j, member in enumerate(group.tools):
                inner.append((group.name, member, f"{where}.tools[{j}]"))
            continue
        else:
            untranslated.append(where)  # a hosted tool: only OpenAI's own servers run it
            continue
        out.append({"type": "function", "function": function})
    names = {tool["function"]["name"] for tool in out}
    for namespace, member, where in inner:
        if convert(member, _Typed, where).type != "function":
            untranslated.append(where)
            continue
        function = _function(member, where)
        if function["name"] in names:  # the upstream knows a function by its name alone
            untranslated.append(where)
            continue
        names.add(function["name"])
        namespaces[function["name"]] = namespace
        out.append({"type": "function", "function": function})
    return out, custom, namespaces


def _function(tool: dict[str, Any], where: str) -> dict[str, Any]:
    given = convert(tool, _FunctionTool, where)
    function: dict[str, Any] = {
        "name": given.name,
        "parameters": given.parameters or {"type": "object", "properties": {}},
    }
    if given.description:
        function["description"] = given.description
    if given.strict is not None:
        function["strict"] = given.strict
    return function


def _tool_choice(choice: str | dict[str, Any], untranslated: list[str]) -> Any:
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise invalid(f"unknown tool_choice '{choice}'", "$.tool_choice")
        return choice
    kind = choice.get("type")
    if kind in ("function", "custom"):
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise invalid("a function tool_choice needs `name`", "$.tool_choice")
        return {"type": "function", "function": {"name": name}}
    if kind == "allowed_tools" and choice.get("mode") in ("auto", "required"):
        untranslated.append("$.tool_choice.tools")  # the mode survives, the subset does not
        return choice["mode"]
    untranslated.append("$.tool_choice")
    return None


def _text(text: _Text, chat: dict[str, Any]) -> None:
    if text.verbosity:
        chat["verbosity"] = text.verbosity
    form = text.format
    if not form or form.get("type") == "text":
        return
    if form.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
        return
    if form.get("type") == "json_schema":
        schema = {k: form[k] for k in ("name", "schema", "strict", "description") if k in form}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
        return
    raise invalid(f"unknown text format '{form.get('type')}'", "$.text.format.type")
