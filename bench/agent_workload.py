"""The agent bench's text: a shared system prompt with OpenAI-style tool definitions, and each session's turns.

Standard library and ``tokenizers`` only (the client side never imports MLX). Sizes are in the bench
model's own tokens, counted with its ``tokenizer.json``.

The tool definitions are the realistic ``tools`` JSON of a coding agent, rendered into the system prompt
in the ``<tools>{json}</tools>`` convention (Hermes/Qwen; what our server writes for a model whose chat
template knows no tools) rather than sent as the ``tools`` parameter: the bench model's template (SmolLM2's)
ignores ``tools``, and each server would otherwise render them differently (ours into a system message,
``mlx_lm.server`` dropping them), so the servers would not see the same prompt.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.prompts import sentence


def _fn(name: str, description: str, properties: dict[str, dict[str, object]], required: list[str]) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


def _s(description: str, **extra: object) -> dict[str, object]:
    return {"type": "string", "description": description, **extra}


TOOLS = [
    _fn(
        "read_file",
        "Read a text file of the repository. Returns its lines with line numbers; long files are cut at "
        "`limit` lines from `offset`.",
        {
            "path": _s("Path relative to the repository root."),
            "offset": {"type": "integer", "description": "First line (1-based).", "minimum": 1},
            "limit": {"type": "integer", "description": "Lines to return.", "minimum": 1, "maximum": 2000},
        },
        ["path"],
    ),
    _fn(
        "write_file",
        "Create or overwrite a file with the given content. Parent folders are created.",
        {"path": _s("Path relative to the repository root."), "content": _s("The whole new content.")},
        ["path", "content"],
    ),
    _fn(
        "edit_file",
        "Replace one exact, unique occurrence of `old` with `new` in a file. Fails when `old` is absent or "
        "occurs more than once.",
        {"path": _s("Path relative to the repository root."), "old": _s("Text to replace."), "new": _s("New text.")},
        ["path", "old", "new"],
    ),
    _fn(
        "search_code",
        "Search the repository for a regular expression; returns matching lines with paths and line numbers.",
        {
            "pattern": _s("A regular expression (Rust regex syntax)."),
            "glob": _s("Only files matching this glob, e.g. '*.py'."),
            "max_results": {"type": "integer", "default": 50, "minimum": 1, "maximum": 500},
        },
        ["pattern"],
    ),
    _fn(
        "list_directory",
        "List a folder's entries, folders first, with sizes.",
        {"path": _s("Folder relative to the repository root."), "depth": {"type": "integer", "enum": [1, 2, 3]}},
        ["path"],
    ),
    _fn(
        "run_command",
        "Run a shell command in the repository root and return its exit status, stdout and stderr (last 10,000 "
        "characters). Commands that need the network fail.",
        {
            "command": _s("The bash command line."),
            "timeout_s": {"type": "number", "description": "Seconds before it is killed.", "default": 120},
        },
        ["command"],
    ),
    _fn(
        "run_tests",
        "Run the test suite, or the tests that match a pytest node id or keyword.",
        {
            "target": _s("A test file, node id or -k expression; empty for the fast suite."),
            "verbose": {"type": "boolean", "default": False},
        },
        [],
    ),
    _fn(
        "web_search",
        "Search the web; returns titles, addresses and snippets of the top results.",
        {
            "query": _s("What to search for."),
            "site": _s("Restrict to this domain, e.g. 'docs.python.org'."),
            "recency": _s("How recent the results must be.", enum=["any", "day", "week", "month", "year"]),
        },
        ["query"],
    ),
    _fn(
        "create_issue",
        "File an issue in the tracker with a title, a body in Markdown and labels.",
        {
            "title": _s("One line."),
            "body": _s("Markdown."),
            "labels": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "priority": _s("Triage priority.", enum=["low", "normal", "high", "urgent"]),
        },
        ["title", "body"],
    ),
]


@dataclass(frozen=True)
class Workload:
    system: str  # the shared system prompt (instructions + tools)
    system_tokens: int
    turn_tokens: int  # each turn's added message, in tokens


def counter(tokenizer_json: Path) -> Callable[[str], int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    return lambda text: len(tok.encode(text).ids)


def fill(head: str, target: int, count: Callable[[str], int], seed: str, tail: str = "") -> str:
    """``head`` + sentences (fixed ``seed``) + ``tail``, grown until it holds about ``target`` tokens."""
    rng = random.Random(seed)
    body: list[str] = []
    estimate = count(head + tail)
    while estimate < target:  # sentence by sentence (linear), then checked on the whole text
        body.append(sentence(rng, 6))
        estimate += count(" " + body[-1])
    while count(head + " ".join(body) + tail) < target:
        body.append(sentence(rng, 6))
    return head + " ".join(body) + tail


def system_prompt(tokens: int, count: Callable[[str], int], nonce: str = "") -> str:
    """About ``tokens`` tokens: who the agent is, the tools, then house rules. ``nonce`` (first line) makes a
    prompt that shares no prefix with the workload's."""
    tools = "\n".join(json.dumps(t, separators=(", ", ": ")) for t in TOOLS)
    head = (
        f"{nonce}You are Forge, a coding agent working in a user's repository. You plan, read code, make small "
        "edits, run the tests and report what you changed.\n\n# Tools\n\nYou may call one or more functions to "
        "assist with the user query. You are provided with function signatures within <tools></tools> XML "
        f"tags:\n<tools>\n{tools}\n</tools>\n\nFor each function call, return a json object with function name "
        "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n\n# House rules\n\n'
    )
    return fill(head, tokens, count, f"agent-system-{nonce}")


def turn_message(session: int, turn: int, tokens: int, count: Callable[[str], int]) -> str:
    """Session ``session``'s message at ``turn`` (1-based): the task, then tool results and user follow-ups
    in turn, each about ``tokens`` tokens and different in every session."""
    seed = f"agent-{session}-{turn}"
    if turn == 1:
        head = f"Session {session}. Task: the build fails after the last merge. Find out why and fix it. Notes: "
        return fill(head, tokens, count, seed)
    if turn % 2 == 0:
        head = (
            f'<tool_response>\n{{"session": {session}, "turn": {turn}, "tool": "run_command", "exit_status": 1, '
            '"stdout": "'
        )
        return fill(head, tokens, count, seed, tail='"}\n</tool_response>')
    head = f"Session {session}, turn {turn}: that is not it yet. Look again; here is what I see: "
    return fill(head, tokens, count, seed)


def fresh_prompt(tokens: int, count: Callable[[str], int], nonce: str) -> str:
    """A prompt of about ``tokens`` tokens that shares no prefix with anything else sent."""
    return fill(f"Fresh {nonce}. Summarise this: ", tokens, count, f"fresh-{nonce}")


def workload(tokenizer_json: Path, system_tokens: int, turn_tokens: int) -> Workload:
    count = counter(tokenizer_json)
    text = system_prompt(system_tokens, count)
    return Workload(system=text, system_tokens=count(text), turn_tokens=turn_tokens)
