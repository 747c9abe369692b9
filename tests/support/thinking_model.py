"""A tiny llama that really thinks: greedy decoding follows a fixed script
``<think>\\n`` -> "Let me think about it" -> ``</think>`` -> "The answer is blue!" -> end of turn,
with a Qwen3-style chat template (``enable_thinking``), so reasoning is split from real output.

How: every attention ``o_proj`` and MLP ``down_proj`` is zero, so the final hidden state is the
current token's own embedding; each scripted token's embedding is a one-hot direction, and the
(untied) ``lm_head`` maps that direction to the next token of the script. The next token depends on
the current one only, so the script's tokens are all distinct. ``<think>`` and ``</think>`` replace
two unused added tokens of the SmolLM2 tokenizer, which mlx-lm then recognises as thinking markers.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.tiny_models import build_tiny_llama

THINK_START, THINK_END = "<think>", "</think>"
REASONING = "Let me think about it"
ANSWER = "The answer is blue!"
# Thinking on: the prompt ends "<think>\n", the model writes the reasoning, "</think>\n\n", the answer.
# Thinking off: the prompt ends "<think>\n\n</think>\n\n" and the model writes the answer alone.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{ '<think>\\n' }}{%- endif %}{%- endif %}"
)
REPLACED = {15: THINK_START, 16: THINK_END}  # "<jupyter_script>", "<empty_output>": unused in chat


def _retokenize(folder: Path) -> None:
    """``<think>``/``</think>`` as (non-special) added tokens, and the thinking chat template."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    old = {t["id"]: t["content"] for t in tok["added_tokens"]}
    for entry in tok["added_tokens"]:
        if entry["id"] in REPLACED:
            entry["content"], entry["special"] = REPLACED[entry["id"]], False
    vocab = tok["model"]["vocab"]
    for token_id, content in REPLACED.items():
        vocab.pop(old[token_id], None)
        vocab[content] = token_id
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for token_id, content in REPLACED.items():
        entry = config.get("added_tokens_decoder", {}).get(str(token_id))
        if entry is not None:
            entry["content"], entry["special"] = content, False
    config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def script_ids(folder: Path) -> list[int]:
    """The token chain greedy decoding follows: "\\n" (the prompt's last token) -> reasoning ->
    ``</think>`` -> "\\n\\n" -> answer -> ``<|im_end|>``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))

    def ids(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    chain = ids("\n") + ids(REASONING) + ids(THINK_END) + ids("\n\n") + ids(ANSWER) + ids("<|im_end|>")
    if len(set(chain)) != len(chain):
        raise ValueError(f"the script's tokens repeat: {chain}")
    return chain


def build_thinking_llama(out: Path, tokenizer_from: Path) -> Path:
    """The model folder (mlx-lm llama, fp32) in ``out``."""
    import mlx.core as mx

    build_tiny_llama(out, tokenizer_from, hidden=64, layers=2, seed=7)
    _retokenize(out)
    config = json.loads((out / "config.json").read_text())
    config["tie_word_embeddings"] = False
    config["max_position_embeddings"] = 4096  # room for Anthropic's budget_tokens >= 1024 < max_tokens
    config["bos_token_id"], config["eos_token_id"] = 1, 2  # SmolLM2's: what a GGUF of it records
    (out / "config.json").write_text(json.dumps(config))
    weights = dict(mx.load(str(out / "model.safetensors")))
    hidden = config["hidden_size"]
    for name, value in list(weights.items()):
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = mx.zeros_like(value)
    embed = weights["model.embed_tokens.weight"]
    chain = script_ids(out)
    if len(chain) - 1 > hidden:
        raise ValueError("the script is longer than the hidden size")
    rows = mx.arange(embed.shape[0])[:, None]
    lm_head = mx.zeros_like(embed)
    for slot, (token, following) in enumerate(zip(chain, chain[1:], strict=False)):
        direction = (mx.arange(hidden) == slot).astype(embed.dtype)
        embed = mx.where(rows == token, direction[None, :], embed)
        lm_head = mx.where(rows == following, 10.0 * direction[None, :], lm_head)
    weights["model.embed_tokens.weight"] = embed
    weights["lm_head.weight"] = lm_head
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    return out
