"""What `deepred serve` asks of a request before llama-cpp-python's app sees it.

The app answers a body it cannot use with 500 "internal_server_error" (a server fault, which clients such as the
openai package retry though the same body fails every time), its message a pydantic dump with the server's file
paths; and it answers a chat request without messages by generating from an empty prompt. Here such requests get
400 and one line that names the field and what it should be, checked with the app's own request models.
"""

from __future__ import annotations

import json

from .chat_template import TemplateError, fold_system_prompt

# The app's POST routes and the request model (in llama_cpp.server.types) each one reads its body with.
ROUTE_MODELS = {
    "/v1/chat/completions": "CreateChatCompletionRequest",
    "/v1/completions": "CreateCompletionRequest",
    "/v1/engines/copilot-codex/completions": "CreateCompletionRequest",
    "/v1/embeddings": "CreateEmbeddingRequest",
    "/extras/tokenize": "TokenizeInputRequest",
    "/extras/tokenize/count": "TokenizeInputRequest",
    "/extras/detokenize": "DetokenizeInputRequest",
}
MOST_FIELDS_NAMED = 3


class RequestFilter:
    """ASGI middleware in front of llama-cpp-python's app, for POST requests (every one carries a JSON body):

    - a body that is not one JSON object (empty, not UTF-8, cut short, a list) gets 400 and what is wrong with it;
    - a request naming a model that is not served gets 404 and the list of served names; one naming none is sent
      to the first model;
    - a request the route's model refuses (a field of the wrong type, an unknown role, a required field missing) or
      a chat request without messages gets 400, naming each field (`messages[0].role`) and what it should be;
    - a chat request to a model whose template has no system role (`without_system_role`: Gemma 1/2, Mistral v0.1,
      which raise on one or drop it) gets its system prompt at the start of the first user message, as training put
      it there.
    """

    def __init__(self, app, names: list[str], without_system_role: set[str] = frozenset()):
        self.app, self.names, self.without_system_role = app, names, without_system_role

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        request, problem = parse_body(body)
        if problem is not None:
            return await error_response(400, problem, "invalid_json")(scope, receive, send)
        model = request.get("model")
        if isinstance(model, str) and model not in self.names:
            return await error_response(404, f"model {model!r} is not served here; available: "
                                        f"{', '.join(self.names)}", "model_not_found",
                                        available=self.names)(scope, receive, send)
        param, problem = request_problem(scope.get("path", ""), request)
        if problem is not None:
            return await error_response(400, problem, "invalid_request", param=param)(scope, receive, send)
        if model is None and scope.get("path") in ROUTE_MODELS:
            # the first model, answering under its name (the app alone answers with whichever model a request last
            # switched to, named by its file path)
            model = request["model"] = self.names[0]
            body = json.dumps(request).encode()
        if scope.get("path") == "/v1/chat/completions" and model in self.without_system_role:
            try:
                body = json.dumps({**request, "messages": fold_system_prompt(request["messages"])}).encode()
            except TemplateError as exc:
                return await error_response(400, str(exc), "invalid_request", param="messages")(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def parse_body(body: bytes) -> tuple[dict | None, str | None]:
    """(the request, None), or (None, what is wrong with the body: it must be one JSON object, as every POST route
    of the app reads one)."""
    if not body.strip():
        return None, "the request body is empty; send a JSON object such as {\"model\": ..., \"messages\": [...]}"
    try:
        text = body.decode("utf-8-sig")  # JSON over HTTP is UTF-8 (RFC 8259); a BOM is tolerated, as the app does
    except UnicodeDecodeError as exc:
        return None, f"the request body is not valid UTF-8 (byte {exc.start}); send JSON encoded as UTF-8"
    try:
        request = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, (f"the request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                      "send one complete JSON object")
    except RecursionError:
        return None, "the request body is JSON nested too deeply to read; send a flatter JSON object"
    if not isinstance(request, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(request), "a number")
        return None, f"the request body is {kind} in JSON, not an object; send one JSON object"
    return request, None


def request_problem(path: str, request: dict) -> tuple[str | None, str | None]:
    """(None, None) for a request the route can use; else (the first field at fault, one line saying what is
    wrong). Routes the app does not have are left to it (404)."""
    from llama_cpp.server import types
    from pydantic import ValidationError

    if path not in ROUTE_MODELS:
        return None, None
    try:
        getattr(types, ROUTE_MODELS[path]).model_validate(request)
    except ValidationError as exc:
        faults = field_faults(exc.errors(include_url=False), request)
        shown = [f"{field} {what}" for field, what in list(faults.items())[:MOST_FIELDS_NAMED]]
        more = len(faults) - len(shown)
        return next(iter(faults)), ("invalid request: " + "; ".join(shown) + (f"; and {more} more" if more else ""))
    if path == "/v1/chat/completions" and not request.get("messages"):
        return "messages", ("invalid request: messages is missing or empty; send at least one message, e.g. "
                            "[{\"role\": \"user\", \"content\": \"Hello\"}]")
    return None, None


def field_faults(errors: list[dict], request: dict) -> dict[str, str]:
    """pydantic's errors as {field as the client wrote it: what it should be}.

    Where a field may take several shapes (a message is a system, user, assistant, tool or function message), pydantic
    reports every shape's errors. The shape the client meant is the one whose tag fields (`role`, `type`) and JSON
    kind match; its errors are the ones reported. Where none matches, what each shape would accept is listed.
    """
    messages: dict[str, list[str]] = {}
    for field, error in narrowed([(tuple(e["loc"]), e) for e in errors], request, ""):
        messages.setdefault(field, []).append(describe(error))
    return {field: merged(said) for field, said in messages.items()}


def narrowed(errors: list[tuple[tuple, dict]], node, field: str) -> list[tuple[str, dict]]:
    """(field, error) for the errors under `node`, each loc relative to it, keeping one shape per union."""
    here, by_key, branches = [], {}, {}
    for loc, error in errors:
        if not loc:
            here.append((field, error))
        elif isinstance(node, list) and isinstance(loc[0], int):
            by_key.setdefault(loc[0], []).append((loc[1:], error))
        elif isinstance(node, dict) and (loc[0] in node or error["type"] == "missing" and len(loc) == 1):
            by_key.setdefault(loc[0], []).append((loc[1:], error))
        else:  # not in the client's JSON: the name of one shape of a union
            branches.setdefault(loc[0], []).append((loc[1:], error))
    found = list(here)
    for key, below in by_key.items():
        name = f"{field}[{key}]" if isinstance(key, int) else f"{field}.{key}" if field else str(key)
        child = node[key] if isinstance(node, list) or key in node else None
        found += narrowed(below, child, name)
    if branches:
        found += union_faults(branches, node, field)
    return found


def union_faults(branches: dict, node, field: str) -> list[tuple[str, dict]]:
    meant = {tag: errs for tag, errs in branches.items() if not mismatched(errs)}
    if not meant:  # no shape matches the tags or kind the client sent: say what each would accept
        return [(field if not loc else f"{field}.{loc[0]}", error)
                for errs in branches.values() for loc, error in errs if is_mismatch(loc, error)]
    fewest = min(len(errs) for errs in meant.values())
    return [pair for errs in meant.values() if len(errs) == fewest for pair in narrowed(errs, node, field)]


def mismatched(errs: list[tuple[tuple, dict]]) -> bool:
    return any(is_mismatch(loc, error) for loc, error in errs)


def is_mismatch(loc: tuple, error: dict) -> bool:
    """The shape's own JSON kind is wrong (a string where it takes a list), or one of its tag fields is."""
    return (not loc and error["type"].endswith("_type")) or (len(loc) == 1 and error["type"] == "literal_error")


def describe(error: dict) -> str:
    text = error["msg"]
    return "is required" if error["type"] == "missing" else text[0].lower() + text[1:]


def merged(said: list[str]) -> str:
    """'input should be 'system'' and 'input should be 'user'' -> "should be 'system' or 'user'"."""
    said = list(dict.fromkeys(said))
    prefix = "input should be "
    if all(s.startswith(prefix) for s in said):
        options = [s[len(prefix):] for s in said]
        joined = options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]
        return "should be " + joined
    return "; ".join(s.removeprefix("input ") for s in said)


def error_response(status: int, message: str, code: str, param: str | None = None, **extra):
    """An OpenAI-style error response."""
    from starlette.responses import JSONResponse

    error = {"message": message, "type": "invalid_request_error", "param": param, "code": code, **extra}
    return JSONResponse({"error": error}, status_code=status)
