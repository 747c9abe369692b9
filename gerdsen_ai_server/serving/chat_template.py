"""Chat templates rendered within bounds: a deadline on the rendering, and no single expression
that runs unbounded in C.

A chat template is code from the model's files (any pulled repository can carry one), which
Hugging Face runs in Jinja's sandbox. The sandbox keeps a template away from Python's internals,
not from work: two nested ``range(100000)`` loops held a request thread and a core for hours, and
``{{ 9 ** (9 ** 9) }}`` hangs inside one C call (already while Jinja folds constants at compile time).

* The deadline: the template's rendering runs under a trace function (``sys.settrace``, this
  thread only) that raises ``TemplateTimeout`` once ``IMPETUS_TEMPLATE_TIMEOUT`` has passed. It
  checks the clock at every Python call and at every line of the compiled template, so any loop of
  the template ends there, and the thread is free again at once. Only the rendering proper is
  traced (``BoundedTemplate.render``), not the tokenizer's preparation around it. Cost, SmolLM2's
  template over 21 messages: 0.22 ms → 0.47 ms (tests/api/test_safe_inputs.py keeps it under +2 ms).
* No unbounded C call: Jinja lets an environment intercept binary operators; ours refuses ``**``
  and ``*`` whose result would be huge (an integer of more than ``MAX_INT_BITS`` bits, a string or
  list of more than ``MAX_SEQUENCE`` items), and intercepted operators are never folded at compile
  time. ``range`` is already capped at 100,000 by the sandbox.

What this does not bound is memory: a template that doubles a string in a loop reaches gigabytes
in a few dozen steps, each a fast C call. Bounding that needs a separate process with resource
limits (neither llama.cpp's server nor vLLM has one either).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from types import FrameType
from typing import Any, TypeVar

from jinja2.environment import Template
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_INT_BITS = 1 << 16  # ~20,000 decimal digits: any such product or power takes microseconds
MAX_SEQUENCE = 1 << 24  # characters of a string (or items of a list) made by one ``*``
TEMPLATE_FILENAME = "<template>"  # what Jinja names the code it compiles from a string


class TemplateTimeout(Exception):
    """The chat template ran past its deadline."""


# Seconds the rendering in this thread (or context) may take; None: no deadline (a template
# rendered outside ``render_chat_template``).
_budget: ContextVar[float | None] = ContextVar("chat_template_budget", default=None)


class BoundedTemplate(Template):
    """A compiled template whose ``render`` keeps to the deadline ``render_chat_template`` set."""

    def render(self, *args: Any, **kwargs: Any) -> str:
        seconds = _budget.get()
        if seconds is None:
            return super().render(*args, **kwargs)
        return with_deadline(lambda: super(BoundedTemplate, self).render(*args, **kwargs), seconds)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Hugging Face's sandbox, with ``*`` and ``**`` refusing results too large to compute at once,
    and templates that render under the deadline."""

    intercepted_binops = frozenset({"*", "**"})
    template_class = BoundedTemplate

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            if abs(left) > 1 and right * abs(left).bit_length() > MAX_INT_BITS:
                raise SecurityError(f"the chat template computes a power of more than {MAX_INT_BITS} bits")
        if operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                    raise SecurityError(f"the chat template computes a product of more than {MAX_INT_BITS} bits")
            else:
                sequence, count = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(count, int) and isinstance(sequence, str | list | tuple):
                    if len(sequence) * count > MAX_SEQUENCE:
                        raise SecurityError(f"the chat template repeats a sequence to more than {MAX_SEQUENCE} items")
        return super().call_binop(context, operator, left, right)


_installed = False
_install_lock = threading.Lock()


def install_bounded_sandbox() -> bool:
    """Makes Hugging Face compile chat templates in ``BoundedSandbox`` (its compile function looks the
    sandbox class up in its module, so replacing that name is enough), and drops templates compiled
    before. Idempotent; False (and a warning) if this transformers version has no such name, in
    which case the deadline still applies."""
    global _installed
    with _install_lock:
        if _installed:
            return True
        try:
            from transformers.utils import chat_template_utils as hf
        except ImportError:
            return False
        if not hasattr(hf, "ImmutableSandboxedEnvironment") or not hasattr(hf, "_compile_jinja_template"):
            log.warning(
                "transformers compiles chat templates differently than expected: templates run without "
                "operator bounds (the deadline still applies)"
            )
            return False
        hf.ImmutableSandboxedEnvironment = BoundedSandbox  # type: ignore[misc]  # the patch itself: a class swap
        hf._compile_jinja_template.cache_clear()
        _installed = True
        return True


def with_deadline(render: Callable[[], T], seconds: float) -> T:
    """``render()`` in this thread, raising ``TemplateTimeout`` from inside it after ``seconds``.

    If a tracer already runs in this thread (a debugger, coverage), it is left alone and the
    rendering has no deadline: two tracers cannot share ``sys.settrace``.
    """
    if sys.gettrace() is not None:
        return render()
    deadline = time.monotonic() + seconds

    def in_template(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise TemplateTimeout(f"the chat template took more than {seconds:g} s")
        return in_template

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise TemplateTimeout(f"the chat template took more than {seconds:g} s")
        # Line events only inside the template's own code: its loops are where the time goes, and
        # tracing every line of the Jinja runtime as well would triple the overhead.
        return in_template if frame.f_code.co_filename == TEMPLATE_FILENAME else None

    sys.settrace(on_call)
    try:
        return render()
    finally:
        sys.settrace(None)


def render_chat_template(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    extra: dict[str, Any],
    seconds: float,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """The prompt text of ``messages`` (not tokenized: the caller checks its size first). ``extra``:
    template variables (tools, ``chat_template_kwargs``); ``add_generation_prompt`` opens the
    assistant's turn, ``continue_final_message`` leaves the last message open (Hugging Face's).

    The deadline covers the Jinja rendering when the bounded sandbox is in place (a template
    written in Python by mlx-lm is trusted code and runs as it is); otherwise the whole call.
    """
    controls: dict[str, Any] = {"add_generation_prompt": add_generation_prompt}
    if continue_final_message:  # only when asked: a template written in Python may not take it
        controls["continue_final_message"] = True

    def render() -> Any:
        return tokenizer.apply_chat_template(messages, tokenize=False, **controls, **extra)

    if install_bounded_sandbox():
        token = _budget.set(seconds)
        try:
            text = render()
        finally:
            _budget.reset(token)
    else:
        text = with_deadline(render, seconds)
    if not isinstance(text, str):
        raise TypeError(f"the chat template rendered {type(text).__name__}, not text")
    return text
