"""Reasoning kept apart from the answer: a thinking model's ``<think>…</think>`` text split from
its reply, streamed or whole, as vLLM's reasoning parsers, llama-server (``reasoning_format``) and
mlx_lm.server do; and the template variables that switch thinking on or off.

* The markers come from the tokenizer: mlx-lm's wrapper finds ``<think>``/``</think>`` (Qwen3,
  DeepSeek-R1 distills, SmolLM3, ...) and its peers in the vocabulary (``think_start``/``think_end``);
  a model without them is not split at all, so its answers are exactly what they were.
* The prompt may already be inside the thinking: DeepSeek-R1's and Qwen3's templates end the
  generation prompt with ``<think>\\n``, so the model writes only the closing marker (vLLM's
  deepseek_r1 parser handles the same). Whether it is, is read from the rendered prompt: its last
  start marker after its last end marker. ``enable_thinking: false`` renders an empty block
  (``<think>\\n\\n</think>\\n\\n``): then the reply is all content.
* Outside, a start marker counts only at the very beginning of the reply (after whitespace): one
  reasoning block, then the answer, as vLLM's parsers take it. Whitespace around the reasoning and
  at the start of the answer is trimmed (llama-server trims it too; vLLM keeps it).
* gpt-oss's harmony channels (a chat template that writes ``<|channel|>``/``<|message|>``): the
  ``analysis`` channel up to ``<|end|>`` is the reasoning, and the ``final`` channel's header
  (``<|start|>assistant<|channel|>final<|message|>``) is dropped from the answer. Its ``commentary``
  channel (tool calls) is not parsed: such a reply stays in the content as written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.openai import ChatCompletionRequest

State = Literal["pending", "reasoning", "content"]


@dataclass(frozen=True)
class ReasoningPlan:
    """How one request's replies split: the model's markers, and whether the prompt ends inside
    its thinking (the reply then starts with reasoning)."""

    start: str
    end: str
    inside: bool
    openers: tuple[str, ...] = ()  # what opens the answer, dropped (harmony's final channel header)

    def splitter(self) -> ReasoningSplitter:
        """A new splitter: one per choice (n > 1 choices each have their own)."""
        return ReasoningSplitter(self.start, self.end, self.inside, self.openers)


# gpt-oss's harmony format: the reply is "<|channel|>analysis<|message|>THINKING<|end|>" then
# "<|start|>assistant<|channel|>final<|message|>ANSWER" (the generation prompt ends "<|start|>assistant").
HARMONY_START, HARMONY_END = "<|channel|>analysis<|message|>", "<|end|>"
HARMONY_OPENERS = ("<|start|>assistant<|channel|>final<|message|>", "<|channel|>final<|message|>")


def markers(tokenizer: Any) -> tuple[str, str, tuple[str, ...]] | None:
    """The model's reasoning markers and answer openers, or None: mlx-lm's wrapper infers think
    markers from the vocabulary; a chat template that writes harmony channels means gpt-oss's."""
    start, end = getattr(tokenizer, "think_start", None), getattr(tokenizer, "think_end", None)
    if isinstance(start, str) and isinstance(end, str) and start and end:
        return start, end, ()
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and "<|channel|>" in template and "<|message|>" in template:
        return HARMONY_START, HARMONY_END, HARMONY_OPENERS
    return None


def reasoning_plan(tokenizer: Any, prompt_text: str) -> ReasoningPlan | None:
    """The split for a reply to ``prompt_text``, or None for a model without reasoning markers."""
    found = markers(tokenizer)
    if found is None:
        return None
    start, end, openers = found
    return ReasoningPlan(start, end, prompt_text.rfind(start) > prompt_text.rfind(end), openers)


def _partial_tail(text: str, marker: str) -> int:
    """The length of the longest tail of ``text`` that is the beginning of ``marker``."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class ReasoningSplitter:
    """Streamed text into (reasoning, content), holding back what could be the start of a marker
    (as ``engine/text.py``'s StopMatcher does for stop strings) and whitespace that may turn out to
    be the reasoning's trailing space. ``feed(text, final=True)`` flushes what is held."""

    def __init__(self, start: str, end: str, inside: bool, openers: tuple[str, ...] = ()) -> None:
        self.start, self.end, self.openers = start, end, openers
        self.state: State = "reasoning" if inside else "pending"
        self._buffer = ""
        self._reasoning_begun = False  # leading whitespace of the reasoning is dropped
        self._content_begun = not inside  # after an end marker, the answer's leading whitespace is too

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self._buffer += text
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            if self.state == "pending":
                head = self._buffer.lstrip()
                if head.startswith(self.start):
                    self._buffer, self.state, self._content_begun = head[len(self.start) :], "reasoning", False
                    continue
                if any(head.startswith(opener) for opener in self.openers):  # straight to the answer
                    self._buffer, self.state, self._content_begun = head, "content", False
                    continue
                if not final and any(m.startswith(head) for m in (self.start, *self.openers)):
                    break  # nothing yet, or a marker's beginning
                self.state = "content"
                continue
            if self.state == "reasoning":
                at = self._buffer.find(self.end)
                if at >= 0:
                    reasoning.append(self._reasoning(self._buffer[:at].rstrip()))
                    self._buffer, self.state = self._buffer[at + len(self.end) :], "content"
                    continue
                if final:
                    reasoning.append(self._reasoning(self._buffer.rstrip()))
                    self._buffer = ""
                    break
                keep = _partial_tail(self._buffer, self.end)
                safe = self._buffer[: len(self._buffer) - keep]
                body = safe.rstrip()  # trailing whitespace waits: it may end the reasoning
                reasoning.append(self._reasoning(body))
                self._buffer = safe[len(body) :] + self._buffer[len(self._buffer) - keep :]
                break
            # content: everything that follows
            out = self._buffer
            if not self._content_begun:
                out = out.lstrip()
                opener = next((o for o in self.openers if out.startswith(o)), None)
                if opener is not None:
                    out = out[len(opener) :].lstrip()
                elif out and not final and any(o.startswith(out) for o in self.openers):
                    self._buffer = out
                    break  # perhaps the answer's opener, not yet whole
                self._content_begun = bool(out)
            content.append(out)
            self._buffer = ""
            break
        return "".join(reasoning), "".join(content)

    def _reasoning(self, text: str) -> str:
        if not self._reasoning_begun:
            text = text.lstrip()
            self._reasoning_begun = bool(text)
        return text


def split_reasoning(plan: ReasoningPlan | None, text: str) -> tuple[str | None, str]:
    """A whole reply as (reasoning or None, content)."""
    if plan is None:
        return None, text
    reasoning, content = plan.splitter().feed(text, final=True)
    return reasoning or None, content


# Reasoning efforts that mean "do not think" where the template can only switch thinking on or off
# (OpenAI's "none": no reasoning tokens). "minimal" still thinks, briefly, so it leaves it on.
THINKING_OFF_EFFORTS = frozenset({"none"})
REASONING_SWITCHES = ("enable_thinking", "reasoning_effort", "thinking")


def template_kwargs(body: ChatCompletionRequest, tokenizer: Any, constrained: bool = False) -> dict[str, Any]:
    """The template variables of a request: its ``chat_template_kwargs``, with ``reasoning_effort``
    passed as the template variable of that name (gpt-oss's templates read it), and "none" turning
    ``enable_thinking`` off where the template has that switch and the request did not set it.
    ``constrained`` (output held to a grammar: a forced tool call, a JSON schema) turns it off too:
    the grammar allows no thinking, so the prompt should not open any.

    A reasoning effort for a model with neither a thinking switch in its template nor reasoning
    markers is a 400, as OpenAI answers it for a model without reasoning."""
    kwargs = dict(body.chat_template_kwargs or {})
    effort = body.reasoning_effort
    template = str(getattr(tokenizer, "chat_template", "") or "")
    if constrained and "enable_thinking" in template:
        kwargs.setdefault("enable_thinking", False)
    if effort is None:
        return kwargs
    if markers(tokenizer) is None and not any(name in template for name in REASONING_SWITCHES):
        raise APIError(
            400,
            f"'reasoning_effort' is not supported with the model '{body.model}': it does not reason "
            "(no thinking markers, and no reasoning switch in its chat template).",
            param="reasoning_effort",
            code="unsupported_parameter",
        )
    kwargs.setdefault("reasoning_effort", effort)
    if effort in THINKING_OFF_EFFORTS and "enable_thinking" in template:
        kwargs.setdefault("enable_thinking", False)
    return kwargs
