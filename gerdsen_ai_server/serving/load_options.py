"""Load options from a request or a preset, checked before the engine sees them: a chat template must compile.

The context length is checked against the model where its files are read (engine/formats/context.py,
a 400 naming ``context_length`` or ``rope_scaling`` through serving/models.py ``model_error``); a
chat template is compiled here, in the same bounded sandbox that will render it
(serving/chat_template.py), so one that does not compile is a 400 naming ``chat_template`` at load,
not a failure of every chat request later. llama-server (``--chat-template``) and vLLM
(``--chat-template``) refuse such a template at start; Ollama's Modelfile TEMPLATE at create.
"""

from __future__ import annotations

from jinja2.exceptions import TemplateError

from gerdsen_ai_server.engine.options import LoadOptions
from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.models import LoadRequest
from gerdsen_ai_server.serving.chat_template import BoundedSandbox, install_bounded_sandbox


def from_request(body: LoadRequest, adapter: str | None = None) -> LoadOptions:
    """``POST /api/models/load``'s options (the adapter as the caller resolved it)."""
    return LoadOptions(
        context_length=body.context_length or 0,
        rope_scaling=body.rope_scaling,
        chat_template=body.chat_template,
        adapter=adapter,
        backend=body.backend,
        alias=body.alias,
        kv_bits=body.kv_bits,
        mmproj=body.mmproj,
    )


def check_chat_template(template: str | None) -> None:
    """Compile ``template`` as Hugging Face will render it (its extensions, our bounded sandbox); a
    400 naming ``chat_template`` when it does not compile."""
    if template is None:
        return
    try:
        if install_bounded_sandbox():
            from transformers.utils.chat_template_utils import _compile_jinja_template

            _compile_jinja_template(template)  # cached: the first chat renders this very compilation
        else:
            BoundedSandbox().from_string(template)
    except (TemplateError, SyntaxError, RecursionError) as exc:
        raise APIError(
            400, f"The chat_template does not compile: {exc}", param="chat_template", code="invalid_value"
        ) from None
