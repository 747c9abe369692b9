"""Stored responses: ``store: true`` keeps a /v1/responses answer for ``previous_response_id`` and
GET/DELETE /v1/responses/{id}, as vLLM and LM Studio keep them: in memory, in this process, under a
byte bound (IMPETUS_RESPONSES_STORE_BYTES), the least recently used dropped first.

As vLLM, nothing is stored unless the request sends ``store: true`` (OpenAI's own default is true:
a client that relies on it gets a 404 naming ``previous_response_id``, never another conversation).
What is kept is the response object as answered and its conversation: the input items (the earlier
ones included, when it continued one) and its output items as input items, so a continuation
prepends them to its own input as OpenAI does; instructions are not carried over (OpenAI's rule).
Each stored response belongs to the API key that made it: another key gets the same 404 as an
unknown id, an admin key reads and deletes any (docs/security.md)."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter

from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.openai import MAX_MESSAGES
from gerdsen_ai_server.schemas.responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputMessage,
    ResponseDeleted,
    ResponsesRequest,
)
from gerdsen_ai_server.services import require, services

Item = InputMessage | FunctionCallItem | FunctionCallOutputItem
ITEMS: TypeAdapter[list[Item]] = TypeAdapter(list[Item])
Keep = Callable[[dict[str, Any]], dict[str, Any]]  # stores a final response; returns it, saying whether it was


@dataclass(frozen=True)
class Owner:
    """Who asks: the id of the API key the request presented (web/keys.py ``key_id``; None on a
    server without keys) and whether that key is an admin's."""

    key_id: str | None = None
    admin: bool = False

    def may_use(self, owner: str | None) -> bool:
        return owner is None or self.admin or owner == self.key_id


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]  # the Response object as it was answered
    conversation: list[dict[str, Any]]  # input items, then the output as input items
    owner: str | None
    size: int  # bytes, as JSON


class ResponseStore:
    """Stored responses by id, bounded by ``max_bytes`` (their JSON size), least recently used
    (stored or read) dropped first. Safe from any request thread."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response_id: str, stored: Stored) -> bool:
        """Keep ``stored``, dropping the least recently used to make room; False (nothing kept, nothing
        dropped) when it alone is larger than the bound."""
        if stored.size > self.max_bytes:
            return False
        with self._lock:
            old = self._items.pop(response_id, None)
            self.bytes -= old.size if old else 0
            while self._items and self.bytes + stored.size > self.max_bytes:
                self.bytes -= self._items.popitem(last=False)[1].size
            self._items[response_id] = stored
            self.bytes += stored.size
        return True

    def get(self, response_id: str, owner: Owner) -> Stored | None:
        with self._lock:
            stored = self._items.get(response_id)
            if stored is None or not owner.may_use(stored.owner):
                return None
            self._items.move_to_end(response_id)
            return stored

    def delete(self, response_id: str, owner: Owner) -> bool:
        with self._lock:
            stored = self._items.get(response_id)
            if stored is None or not owner.may_use(stored.owner):
                return False
            del self._items[response_id]
            self.bytes -= stored.size
            return True


def not_found(response_id: str, param: str) -> APIError:
    return APIError(
        404,
        f"No stored response '{response_id[:100]}': it was never stored (store: true), was deleted or "
        "dropped to make room (IMPETUS_RESPONSES_STORE_BYTES), or another API key stored it.",
        param=param,
        code="response_not_found",
    )


def input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as item dicts (a text input is one user message). Reasoning items a
    client sent back are left out, as the prompt leaves them out (serving/responses.py)."""
    if isinstance(body.input, str):
        return [{"type": "message", "role": "user", "content": body.input}]
    return [item.model_dump(exclude_none=True) for item in body.input if getattr(item, "type", None) != "reasoning"]


def output_items(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as the input items that carry them into the next turn: its message
    as an assistant message, its function calls as themselves (reasoning items are not replayed,
    as chat templates drop earlier turns' thinking)."""
    items: list[dict[str, Any]] = []
    for item in output:
        if item.get("type") == "message":
            text = "".join(part.get("text", "") for part in item.get("content", []))
            items.append({"type": "message", "role": "assistant", "content": text})
        elif item.get("type") == "function_call":
            items.append({k: item[k] for k in ("type", "call_id", "name", "arguments")})
    return items


def continued(body: ResponsesRequest, store: ResponseStore, owner: Owner) -> ResponsesRequest:
    """The request with the stored conversation of ``previous_response_id`` before its own input;
    404 ``response_not_found`` when there is none for this key."""
    if body.previous_response_id is None:
        return body
    stored = store.get(body.previous_response_id, owner)
    if stored is None:
        raise not_found(body.previous_response_id, "previous_response_id")
    items = stored.conversation + input_items(body)
    if len(items) > MAX_MESSAGES:
        raise APIError(
            400,
            f"The conversation would hold {len(items)} items, more than {MAX_MESSAGES}; start a new one.",
            param="previous_response_id",
            code="invalid_value",
        )
    return body.model_copy(update={"input": ITEMS.validate_python(items)})


def keeper(body: ResponsesRequest, full: ResponsesRequest, store: ResponseStore, owner: Owner) -> Keep | None:
    """What stores the final response of ``body`` (``full``: its input with the earlier conversation)
    when it asks to be stored and the store holds anything; None otherwise. The response it returns
    says whether it was kept (``store``): one larger than the whole bound is not."""
    if body.store is not True or store.max_bytes <= 0:
        return None
    conversation = input_items(full)

    def keep(response: dict[str, Any]) -> dict[str, Any]:
        whole = conversation + output_items(response["output"])
        response["store"] = True
        size = len(json.dumps(response)) + len(json.dumps(whole))
        response["store"] = store.put(response["id"], Stored(response, whole, owner.key_id, size))
        return response

    return keep


def app_store() -> ResponseStore:
    """This app's store (app.py makes one per app, sized by IMPETUS_RESPONSES_STORE_BYTES)."""
    return require(services().responses, "responses")


def stateful(body: ResponsesRequest, owner: Owner) -> tuple[ResponsesRequest, Keep | None]:
    """The request as the model sees it (``continued``) and what stores its answer (``keeper``)."""
    store = app_store()
    full = continued(body, store, owner)
    return full, keeper(body, full, store, owner)


def retrieve(response_id: str, owner: Owner) -> dict[str, Any]:
    stored = app_store().get(response_id, owner)
    if stored is None:
        raise not_found(response_id, "response_id")
    return stored.response


def delete(response_id: str, owner: Owner) -> ResponseDeleted:
    if not app_store().delete(response_id, owner):
        raise not_found(response_id, "response_id")
    return ResponseDeleted(id=response_id)
