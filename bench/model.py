"""The benchmark model: a random-weight mlx-lm llama, built once into a cache folder.

    python -m bench.model [--tiny | --shape qwen2.5-0.5b] [--out build/bench-model]
    python -m bench.model --shape qwen2.5-0.5b --probe 4330,6000   # prefill after a cache vs fresh, paired
    python -m bench.model --shape qwen2.5-0.5b --probe 4330 --rounds 1 --attention ab   # our CPU attention vs mlx-lm's

Hidden 512, 8 layers, 8 heads, intermediate 1408 (the model of ``shared/FACTS.md`` and issue 3),
stored in **bfloat16** like real checkpoints, as a standard MLX folder (config.json,
model.safetensors, tokenizer files) that ``mlx_lm.load``, ``python -m mlx_lm.server`` and our
server all load. Weights come from a fixed seed, so every build is identical.

Text is real tokens: the tokenizer is SmolLM2's (taken from the converted default model), cut to
its first ``vocab`` ids. SmolLM2's ids follow its BPE merge order, so keeping the ids below the
cut and the merges whose parts and result are all kept is a valid, smaller BPE tokenizer; any
text still encodes (byte-level fallback), only into more tokens. A 2,048 vocabulary keeps the
output projection (hidden x vocab) from dwarfing the 8 transformer layers, so the bench measures
the layers and the engine, as FACTS.md's figures (same shape, vocab 2048) do.

Benchmarks need generations that never end early, and there is no ``ignore_eos`` in the OpenAI
API: the embedding rows of the end tokens are zero, so with tied embeddings their logit is
exactly 0 while the largest of the other ~1,900 random logits is positive, and greedy decoding
never picks them. Every request runs to ``max_tokens``. The same goes for the other special tokens
and for byte tokens that are not whole UTF-8 characters: a streaming detokenizer holds those back,
so a stream that began with them would show its first text (and its time to first token) several
tokens late (``silent_token_ids``).

``--shape qwen2.5-0.5b`` (``SHAPES``) builds the same recipe at a real model's shape: Qwen2.5-0.5B's
hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, rope theta 1e6, norm eps 1e-6, tied
embeddings (as a llama: no q/k/v biases, 0.1 % of its FLOPs), for benches whose ratios depend on where
a forward pass spends its time; the cost of a pass does not depend on the weights' values, and no
model hub is needed. Its vocabulary stays the cut 2,048 (the tokenizer recipe above), so its output
projection is not Qwen's 136 M parameters: 358 M parameters in all, 0.72 GB in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BUILD_VERSION = 3  # bump when the recipe changes: cached folders of an older recipe are rebuilt
STAMP = "bench-model.json"
TOKENIZER_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class Spec:
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 8
    intermediate: int = 1408
    vocab: int = 2048
    context: int = 4096
    dtype: str = "bfloat16"
    seed: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


BENCH = Spec()
TINY = Spec(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128, vocab=1024, context=2048)
# Qwen2.5-0.5B's config.json: hidden_size 896, num_hidden_layers 24, num_attention_heads 14,
# num_key_value_heads 2, intermediate_size 4864, rope_theta 1000000.0, rms_norm_eps 1e-06, tied embeddings.
QWEN25_05B = Spec(
    hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, context=32768, rope_theta=1e6, norm_eps=1e-6
)
SHAPES = {"bench": BENCH, "qwen2.5-0.5b": QWEN25_05B}
# Fields added after the first recipe enter the stamp only when they differ from their default, so folders
# built before they existed (the bench model in CI caches) stay valid.
_LATER_FIELDS = {"rope_theta": 10000.0, "norm_eps": 1e-5}


def default_models_dir() -> Path:
    """Where the embedded default model is converted (its tokenizer is ours)."""
    env = os.environ.get("IMPETUS_MODELS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "impetus" / "models"


def shape_name(spec: Spec) -> str | None:
    """The ``SHAPES`` name of ``spec``'s shape whatever its context bound (None: not a named shape)."""
    return next((name for name, s in SHAPES.items() if replace(s, context=spec.context) == spec), None)


def default_out(spec: Spec) -> Path:
    shape = shape_name(spec)
    name = (
        "bench-model-tiny"
        if spec == TINY
        else "bench-model"
        if spec == BENCH
        else f"bench-model-{shape}"
        if shape and spec == SHAPES[shape]
        else "bench-model-custom"
    )
    return ROOT / "build" / name


def _stamp(spec: Spec) -> dict[str, object]:
    fields = {k: v for k, v in asdict(spec).items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}
    return {"version": BUILD_VERSION, **fields}


def config_for(spec: Spec) -> dict[str, object]:
    """The folder's config.json: an mlx-lm (and transformers) llama of ``spec``'s shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "intermediate_size": spec.intermediate,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": spec.norm_eps,
        "vocab_size": spec.vocab,
        "max_position_embeddings": spec.context,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": spec.dtype,
    }


def is_built(folder: Path, spec: Spec) -> bool:
    try:
        return json.loads((folder / STAMP).read_text()) == _stamp(spec) and (folder / "model.safetensors").is_file()
    except (OSError, ValueError):
        return False


def _staging(out: Path) -> Path:
    """A fresh sibling folder to build in; renamed onto ``out`` when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    staging.chmod(0o755)
    return staging


def cut_tokenizer(tokenizer_json: dict, vocab: int) -> dict:
    """SmolLM2's byte-level BPE tokenizer limited to its first ``vocab`` ids."""
    tok = json.loads(json.dumps(tokenizer_json))  # deep copy
    model = tok["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"expected a BPE tokenizer, got {model.get('type')!r}")
    kept = {t: i for t, i in model["vocab"].items() if i < vocab}
    if len(kept) != vocab:
        raise ValueError(f"the tokenizer's ids are not dense below {vocab}")
    merges = []
    for merge in model["merges"]:
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        if a in kept and b in kept and a + b in kept:
            merges.append(merge)
    model["vocab"], model["merges"] = kept, merges
    tok["added_tokens"] = [t for t in tok.get("added_tokens", []) if t["id"] < vocab]
    return tok


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (printable stand-ins for the 256 bytes), reversed."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def silent_token_ids(tokenizer_json: dict) -> list[int]:
    """Ids of tokens that would make a benchmark stream stop or go quiet: the special tokens (the end
    tokens stop it; the others are dropped from the text) and byte-level tokens that are not whole
    UTF-8 text (a streaming detokenizer holds them back until the character completes, so the
    first text chunk, and with it the measured time to first token, would come tokens late)."""
    decoder = _byte_decoder()
    silent = {t["id"] for t in tokenizer_json.get("added_tokens", [])}
    for token, i in tokenizer_json["model"]["vocab"].items():
        try:
            text = bytes(decoder[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            silent.add(i)
            continue
        if text == " ":  # a lone space is held until the next token (and trimmed at the start)
            silent.add(i)
    return sorted(silent)


def build(
    out: Path,
    spec: Spec = BENCH,
    models_dir: Path | None = None,
    *,
    quiet: bool = False,
    tokenizer_from: Path | None = None,
) -> Path:
    """Build the model into ``out`` unless a folder of the same recipe is already there.

    The tokenizer comes from the converted default model, or from ``tokenizer_from``: a folder
    with SmolLM2's ``tokenizer.json`` (and its config files), where the default model is not
    installed (a GPU machine given only the wheels it needs)."""
    out = Path(out)
    if is_built(out, spec):
        return out
    sys.path.insert(0, str(ROOT))
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs

    from gerdsen_ai_server.engine.formats.gguf import ensure_default_model

    source = Path(tokenizer_from) if tokenizer_from else ensure_default_model(models_dir or default_models_dir())
    tokenizer = cut_tokenizer(json.loads((source / "tokenizer.json").read_text()), spec.vocab)
    never = silent_token_ids(tokenizer)

    config = config_for(spec)
    mx.random.seed(spec.seed)
    model = Model(ModelArgs.from_dict(config))
    embed = model.model.embed_tokens
    weight = embed.weight
    weight[mx.array(never)] = 0.0  # logit exactly 0: greedy decoding never picks them
    embed.weight = weight
    model.set_dtype(getattr(mx, spec.dtype))
    weights = dict(tree_flatten(model.parameters()))

    staging = _staging(out)
    try:
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        (staging / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
        for name in TOKENIZER_CONFIG_FILES:
            if (source / name).exists():
                shutil.copy(source / name, staging / name)
        (staging / STAMP).write_text(json.dumps(_stamp(spec)))
        if out.exists():  # an older recipe (or a half-built folder from a killed run)
            shutil.rmtree(out)
        try:
            staging.rename(out)
        except OSError:  # another process published it first
            if not is_built(out, spec):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not quiet:
        params = sum(v.size for v in weights.values())
        print(f"bench model: {params / 1e6:.1f} M parameters, {spec.dtype}, vocab {spec.vocab} -> {out}")
    return out


def fp32_copy(folder: Path, out: Path | None = None) -> Path:
    """The same weights upcast to float32 (what our server computes in on CPU), for an engine-to-engine run."""
    folder = Path(folder)
    out = Path(out) if out else folder.with_name(folder.name + "-fp32")
    stamp = json.loads((folder / STAMP).read_text())
    stamp["copy_of"] = str(folder)
    stamp["dtype"] = "float32"
    try:
        if json.loads((out / STAMP).read_text()) == stamp:
            return out
    except (OSError, ValueError):
        pass
    import mlx.core as mx

    weights = {k: v.astype(mx.float32) for k, v in mx.load(str(folder / "model.safetensors")).items()}
    staging = _staging(out)
    try:
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
        config = json.loads((folder / "config.json").read_text())
        config["torch_dtype"] = "float32"
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        for name in ("tokenizer.json", *TOKENIZER_CONFIG_FILES):
            if (folder / name).exists():
                shutil.copy(folder / name, staging / name)
        (staging / STAMP).write_text(json.dumps(stamp))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


PROBE_ATTENTION = {"ours": ("ours",), "mlx": ("mlx",), "ab": ("ours", "mlx")}


def probe(
    folder: Path, contexts: list[int], new: int = 420, rounds: int = 3, attention: str = "ours"
) -> list[tuple[str, int, float, float, float]]:
    """Prefill time of ``new`` tokens after each of ``contexts`` cached tokens against a fresh ``new``-token prompt,
    in paired rounds (fresh, then after the cache; the cache trimmed back between rounds), in this process with
    mlx-lm in float32 (what our server computes in on a CPU): the floor a later agent turn's TTFT has on this
    machine whatever the server's cache does. ``attention`` (``PROBE_ATTENTION``): our CPU prompt attention as
    the server installs it (engine/attention.py), mlx-lm's own, or both alternately in each round ("ab").
    Returns (attention, cached, fresh s, after the cache s, median paired ratio) for each attention and context."""
    import statistics
    import time

    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    sys.path.insert(0, str(ROOT))
    from gerdsen_ai_server.engine import attention as cpu_attention

    modes = PROBE_ATTENTION[attention]
    model, _ = load(str(folder))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    cpu_attention.install(model)

    def tokens(n: int, offset: int) -> mx.array:
        return mx.array([[(i * 7 + offset) % 1900 + 40 for i in range(n)]])

    def prefill(cache: list[Any], x: mx.array, step: int = 512) -> None:
        for i in range(0, x.shape[1], step):
            model(x[:, i : i + step], cache=cache)
            mx.eval([c.state for c in cache])

    cache, have, out = make_prompt_cache(model), 0, []
    try:
        for cached in contexts:
            prefill(cache, tokens(cached - have, have))
            have = cached
            fresh: dict[str, list[float]] = {m: [] for m in modes}
            after: dict[str, list[float]] = {m: [] for m in modes}
            for r in range(rounds):
                for mode in modes:
                    cpu_attention.enabled = mode == "ours"
                    t = time.perf_counter()
                    prefill(make_prompt_cache(model), tokens(new, 1000 + r))
                    fresh[mode].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    prefill(cache, tokens(new, 2000 + r))
                    after[mode].append(time.perf_counter() - t)
                    for layer in cache:
                        layer.trim(new)
            for mode in modes:
                ratios = [a / f for a, f in zip(after[mode], fresh[mode], strict=True)]
                paired = statistics.median(ratios)
                out.append((mode, cached, statistics.median(fresh[mode]), statistics.median(after[mode]), paired))
                print(
                    f"cached {cached}, attention {mode}: fresh {new} tokens {out[-1][2]:.2f} s, after the cache "
                    f"{out[-1][3]:.2f} s, paired ratios {[round(x, 2) for x in ratios]}, median {paired:.2f}"
                )
    finally:
        cpu_attention.enabled = True
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 model for tests")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench", help="a named shape (default bench)")
    parser.add_argument("--out", type=Path, help="folder to build into (default build/bench-model[-tiny|-SHAPE])")
    parser.add_argument("--models-dir", type=Path, help="where the default model (the tokenizer's source) lives")
    parser.add_argument("--tokenizer-from", type=Path, help="a folder with SmolLM2's tokenizer files instead")
    parser.add_argument(
        "--probe", metavar="CACHED,...", help="then time 420 new tokens after these cached ones vs fresh (probe)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds of --probe (default 3)")
    parser.add_argument(
        "--attention",
        choices=sorted(PROBE_ATTENTION),
        default="ours",
        help="--probe's CPU prompt attention: ours (the server's), mlx (mlx-lm's), ab (both, alternating)",
    )
    args = parser.parse_args(argv)
    spec = TINY if args.tiny else SHAPES[args.shape]
    folder = build(args.out or default_out(spec), spec, args.models_dir, tokenizer_from=args.tokenizer_from)
    print(folder)
    if args.probe:
        probe(folder, [int(x) for x in args.probe.split(",")], rounds=args.rounds, attention=args.attention)
    return 0


if __name__ == "__main__":
    sys.exit(main())
