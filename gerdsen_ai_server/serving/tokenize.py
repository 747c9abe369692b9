"""Tokenize, detokenize and apply a chat template without generating: vLLM's ``/tokenize`` and
``/detokenize``, llama-server's ``/apply-template``.

Messages are rendered by serving/chat.py's ``chat_text``, the one path chat completions take, so
``/tokenize`` with messages returns exactly the token ids of a chat completion's prompt (its
``count`` is that completion's ``usage.prompt_tokens``; on a vision model each image's tokens
included, as its processor expands them: ``chat_prompt``) and ``/apply-template`` exactly its text.
Both backends tokenize alike: a llama.cpp model's vocabulary is a Hugging Face tokenizer rebuilt from
its GGUF (engine/formats/gguf_tokenizer.py); an embedding model tokenizes text too.
"""

from __future__ import annotations

from typing import Any

from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.openai import ChatCompletionRequest
from gerdsen_ai_server.schemas.tokenize import (
    CHAT_ONLY,
    ApplyTemplateRequest,
    ApplyTemplateResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    TemplateFields,
    TokenizeRequest,
    TokenizeResponse,
)
from gerdsen_ai_server.services import services
from gerdsen_ai_server.serving.chat import chat_prompt, chat_text
from gerdsen_ai_server.serving.images import check_images, image_parts, require_vision
from gerdsen_ai_server.serving.models import resident_model
from gerdsen_ai_server.serving.prompts import check_text_size
from gerdsen_ai_server.serving.tools import plan_tools


def model_for(model: str | None) -> LoadedModel:
    """The named model (resident, or loaded on demand under IMPETUS_AUTOLOAD, as for chat), an
    embedding model included; without a name, the server's default model, as vLLM and llama-server
    (which serve one model) need none."""
    if model is None:
        pinned = [r.loaded.model_id for r in list(services().engine.registry.residents.values()) if r.pinned]
        if not pinned:
            raise APIError(
                400,
                "No model was named and this server has no default model loaded; send 'model'.",
                param="model",
                code="missing_required_parameter",
            )
        model = pinned[0]
    return resident_model(model, embedding=True)


def template_chat(body: TemplateFields, loaded: LoadedModel) -> ChatCompletionRequest:
    """The messages (and the template's fields) as the chat request they would be, images checked."""
    if loaded.kind == "embedding":
        raise APIError(
            400,
            f"The model '{loaded.model_id}' is an embedding model: it has no chat template; send 'prompt'.",
            param="messages",
            code="model_not_supported",
        )
    fields = {name: getattr(body, name) for name in (*CHAT_ONLY, "messages") if name in body.model_fields_set}
    chat = ChatCompletionRequest(model=loaded.model_id, **fields)
    check_images(chat)
    require_vision(chat, loaded)  # a text model given an image: 400, as chat answers it
    return chat


def template_text(body: TemplateFields, loaded: LoadedModel) -> str:
    """The messages rendered as a chat completion's prompt is (serving/chat.py ``chat_text``), with
    a vision template's image placeholder where each image was."""
    chat = template_chat(body, loaded)
    return chat_text(chat, loaded, plan_tools(chat, loaded.tokenizer), images=bool(image_parts(chat)))


MEDIA_MARKER = "<__media__>"  # engine/backends/llamacpp_vision.py: what an image position (-1) shows


def token_strings(tokenizer: Any, tokens: list[int]) -> list[str]:
    """Each id as the tokenizer's own string for it (``Ġthe``, ``▁the``), as vLLM's ``token_strs``."""
    if any(t < 0 for t in tokens):  # a llama.cpp vision prompt's image positions: libmtmd's marker stood there
        return [MEDIA_MARKER if t < 0 else token_strings(tokenizer, [t])[0] for t in tokens]
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is not None:
        return [str(s) for s in convert(tokens)]
    inner = tokenizer._tokenizer  # an embedding model's tokenizer.json (engine/formats/encoder.py)
    return [str(inner.id_to_token(t)) for t in tokens]


def message_tokens(body: TokenizeRequest, loaded: LoadedModel) -> list[int]:
    """The messages' ids as the chat's prompt holds them (serving/chat.py ``chat_prompt``: on a vision
    model each image expanded into its tokens by the model's processor), or, with ``add_special_tokens``,
    the rendered text tokenized with them added (text only: the processor decides for images)."""
    chat = template_chat(body, loaded)
    plan = plan_tools(chat, loaded.tokenizer)
    if body.add_special_tokens is not True:
        return [int(t) for t in chat_prompt(chat, loaded, plan)]
    if image_parts(chat):
        raise APIError(
            400,
            "'add_special_tokens' cannot be true for messages with images: the model's processor adds "
            "the special tokens the model needs, as for the chat.",
            param="add_special_tokens",
            code="invalid_value",
        )
    return [int(t) for t in loaded.tokenizer.encode(chat_text(chat, loaded, plan), add_special_tokens=True)]


def tokenize(body: TokenizeRequest) -> TokenizeResponse:
    """``prompt`` tokenized as is (special tokens added unless ``add_special_tokens`` is false), or
    ``messages`` rendered and tokenized (none added unless asked: the template writes them)."""
    if (body.prompt is None) == (body.messages is None):
        both = body.prompt is not None
        raise APIError(
            400,
            "Send either 'prompt' or 'messages', not both." if both else "Send 'prompt' (a text) or 'messages'.",
            param="messages" if both else "prompt",
            code="invalid_value" if both else "missing_required_parameter",
        )
    loaded = model_for(body.model)
    if body.prompt is not None:
        for name in CHAT_ONLY:
            if name in body.model_fields_set:
                raise APIError(
                    400, f"'{name}' applies to 'messages', not to 'prompt'.", param=name, code="invalid_value"
                )
        check_text_size(loaded, [body.prompt], "prompt")
        tokens = [
            int(t)
            for t in loaded.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
        ]
    else:
        tokens = message_tokens(body, loaded)
    return TokenizeResponse(
        count=len(tokens),
        max_model_len=loaded.context_length,
        tokens=tokens,
        token_strs=token_strings(loaded.tokenizer, tokens) if body.return_token_strs else None,
    )


def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
    """The ids as text, special tokens included (vLLM's): an id outside the vocabulary is a 400."""
    loaded = model_for(body.model)
    vocab = len(loaded.tokenizer)
    bad = next((t for t in body.tokens if t < 0 or t >= vocab), None)
    if bad is not None:
        raise APIError(
            400,
            f"'tokens' holds {bad}, outside this model's vocabulary (0..{vocab - 1}).",
            param="tokens",
            code="invalid_value",
        )
    return DetokenizeResponse(prompt=str(loaded.tokenizer.decode(body.tokens)))


def apply_template(body: ApplyTemplateRequest) -> ApplyTemplateResponse:
    """The chat template's text for these messages, not tokenized (llama-server's /apply-template)."""
    return ApplyTemplateResponse(prompt=template_text(body, model_for(body.model)))
