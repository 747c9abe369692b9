"""A request's JSON body as a schema, or a 400 that says what is wrong with it.

A plain function of the body's bytes (the route reads them: ``request.get_data(cache=False)``,
so no second copy of a large body is kept), shared by every route that takes JSON.
"""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel

from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.limits import (
    LONE_SURROGATE_ESCAPE,
    MAX_JSON_DEPTH,
    JSONShapeError,
    check_json_value,
    check_unicode,
    reject_constant,
)

Schema = TypeVar("Schema", bound=BaseModel)


def parse_body(schema: type[Schema], data: bytes) -> Schema:
    """The body as ``schema``, or a 400: strict JSON (no NaN or Infinity, which Python's parser
    accepts), nested at most ``MAX_JSON_DEPTH`` levels (deeper was a RecursionError, a 500), then
    the schema's own strict types."""
    data = data or b"null"
    try:
        body = json.loads(data, parse_constant=reject_constant)
        check_json_value(body)
        if LONE_SURROGATE_ESCAPE.search(data):
            check_unicode(body)
    except JSONShapeError as exc:
        raise APIError(400, str(exc), param=exc.param, code=exc.code) from None
    except RecursionError:
        raise APIError(
            400, f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.", code="nesting_too_deep"
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "We could not parse the JSON body of your request.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return schema.model_validate(body)
