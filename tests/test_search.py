"""Offline search: streamed recall vs the full matrix, known-best patterns on synthetic heads, candidates, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sgl_minference.config import (AShapeSpec, BlockSparseSpec, DenseSpec, Estimation, MInferenceConfig,
                                   VerticalSlashSpec)
from sgl_minference.tools.search import candidates as cand
from sgl_minference.tools.search.capture import LayerQK, full_attention_layers
from sgl_minference.patterns.selection import Selection, lastq_indices, realise
from sgl_minference.tools.search.recall import head_recall
from sgl_minference.tools.search.searcher import (HeadResult, ScoreSettings, across_prompts, meeting_target,
                                                 score_layer)
from sgl_minference.cpu_torch import allow_torchvision_import

B = 64


def transformers_importable() -> None:
    """transformers imports torchvision when it is installed, which needs the package's CPU-torch workaround."""
    allow_torchvision_import()


transformers_importable()


def reference_mask(sel: Selection, n: int) -> torch.Tensor:
    """``[n, n]`` kept keys straight from the definitions, one query block and one index at a time."""
    m = torch.zeros(n, n, dtype=torch.bool)
    for qb in range(-(-n // B)):
        r0, rows = qb * B, slice(qb * B, min(qb * B + B, n))
        if sel.dense:
            m[rows, :] = True
        for c in sel.columns.tolist():
            m[rows, c] = True
        for o in sel.offsets.tolist():
            m[rows, max(r0 - o, 0): max(r0 - o + B, 0)] = True
        if sel.blocks is not None:
            for kb in range(sel.blocks.shape[1]):
                if sel.blocks[qb, kb]:
                    m[rows, kb * B: kb * B + B] = True
    return m & torch.ones(n, n, dtype=torch.bool).tril()


def full_matrix_recall(q, k, sels, sm_scale, skip):
    n = q.shape[0]
    s = (q.double() @ k.double().T) * sm_scale
    p = torch.softmax(s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")), dim=-1)
    rec = [float((p * reference_mask(sel, n))[skip:].sum() / (n - skip)) for sel in sels]
    keys = [float(reference_mask(sel, n)[skip:].sum(dtype=torch.float64) / (n - skip)) for sel in sels]
    return rec, keys


@pytest.mark.parametrize("n,row_block,skip", [(300, 37, 0), (300, 1000, 50), (515, 128, 200)])
def test_streamed_recall_equals_full_matrix(n, row_block, skip):
    gen = torch.Generator().manual_seed(n)
    q, k = torch.randn(n, 16, generator=gen) * 1.5, torch.randn(n, 16, generator=gen)
    specs = [DenseSpec(), AShapeSpec(sink=8, local=40), VerticalSlashSpec(vertical=40, slash=12),
             VerticalSlashSpec(vertical=5, slash=40), BlockSparseSpec(topk=2)]
    sels = [realise(s, q, k, sm_scale=0.25, est=Estimation(forced_sink=3, forced_local=10)) for s in specs]
    rec, keys = head_recall(q, k, sels, sm_scale=0.25, row_block=row_block, skip_rows=skip)
    ref_rec, ref_keys = full_matrix_recall(q, k, sels, 0.25, skip)
    assert rec.tolist() == pytest.approx(ref_rec, abs=1e-5)
    assert keys.tolist() == pytest.approx(ref_keys, abs=1e-9)
    assert rec[0] == pytest.approx(1.0, abs=1e-6)
    assert all(0.0 < r < 1.0 for r in rec[1:].tolist())
    assert all(0.0 < c < keys[0] for c in keys[1:].tolist())


def test_lastq_indices_match_definition():
    n, d = 200, 8
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    cols, offs = lastq_indices(q, k, sm_scale=0.5, vertical=20, slash=25,
                               est=Estimation(last_q=16, forced_sink=4, forced_local=6))
    p = torch.zeros(16, n)
    for r, i in enumerate(range(n - 16, n)):
        p[r, : i + 1] = torch.softmax((q[i] @ k[: i + 1].T) * 0.5, dim=-1)
    col = p.sum(0)
    diag = torch.zeros(n)
    for r, i in enumerate(range(n - 16, n)):
        for j in range(i + 1):
            diag[i - j] += p[r, j]
    col[:4], diag[:6] = math.inf, math.inf
    assert cols.tolist() == sorted(col.topk(20).indices.tolist())
    assert offs.tolist() == sorted(diag.topk(25).indices.tolist(), reverse=True)
    assert set(range(4)) <= set(cols.tolist()) and set(range(6)) <= set(offs.tolist())


def _score(q, k, budget, skip):
    qk = LayerQK(layer=0, q=q[None], k=k[None], sm_scale=1.0, softcap=None)
    specs = cand.candidate_space(budget)
    res = score_layer(qk, lambda _l, _h: specs, ScoreSettings(row_block=256, skip_rows=skip))[0]
    res.best = cand.choose(res.recall, res.keys, budget)
    return res.specs[res.best], res


def test_local_band_head_picks_local_pattern():
    n, width = 2048, 80.0  # Gaussian attention of std ~width tokens around the diagonal
    theta = math.pi / n
    beta = 1.0 / (theta * width) ** 2
    pos = torch.arange(n, dtype=torch.float64)
    q = torch.stack([torch.cos(theta * pos), torch.sin(theta * pos)], -1) * beta
    k = torch.stack([torch.cos(theta * pos), torch.sin(theta * pos)], -1)
    best, res = _score(q.float(), k.float(), 512, 256)
    assert isinstance(best, AShapeSpec) or (isinstance(best, VerticalSlashSpec) and best.slash > best.vertical)
    assert res.recall[res.best] > 0.99
    vertical_heavy = max((s for s in res.specs if isinstance(s, VerticalSlashSpec)), key=lambda s: s.vertical)
    assert res.recall[res.specs.index(vertical_heavy)] < 0.97


def test_column_head_picks_vertical_heavy():
    n, d = 1024, 32
    gen = torch.Generator().manual_seed(2)
    hot = torch.randperm(n - 64, generator=gen)[:120] + 32  # 120 key columns, none among the forced first 30
    k = torch.randn(n, d, generator=gen) * 0.1
    k[hot, 0] = 1.0
    q = torch.zeros(n, d)
    q[:, 0] = 12.0
    best, res = _score(q, k, 512, 256)
    assert isinstance(best, VerticalSlashSpec) and best.vertical >= 150, best
    assert res.recall[res.best] > 0.95
    a_shape = next(i for i, s in enumerate(res.specs) if isinstance(s, AShapeSpec))
    assert res.recall[a_shape] < 0.8


def test_block_clustered_head_picks_block_sparse():
    n, d = 1024, 64
    nb = n // B
    gen = torch.Generator().manual_seed(3)
    centres = torch.linalg.qr(torch.randn(d, d, generator=gen))[0][:nb]  # orthonormal, one per key block
    k = centres.repeat_interleave(B, dim=0) + 0.05 * torch.randn(n, d, generator=gen)
    target = [0] + [int(torch.randint(0, max(qb - 8, 1), (1,), generator=gen)) for qb in range(1, nb)]
    q = 12.0 * centres[target].repeat_interleave(B, dim=0)
    best, res = _score(q, k, 512, 256)
    assert isinstance(best, BlockSparseSpec), (best, res.recall)
    assert res.recall[res.best] > 0.9


def test_candidate_space_costs():
    for budget in (512, 1638, 6553):
        specs = cand.candidate_space(budget)
        kinds = {type(s) for s in specs}
        assert kinds == {AShapeSpec, VerticalSlashSpec, BlockSparseSpec}
        assert sum(isinstance(s, VerticalSlashSpec) for s in specs) >= 3
        for s in specs:
            assert abs(cand.nominal_cost(s) - budget) <= max(0.15 * budget, 100), (s, budget)
            if isinstance(s, VerticalSlashSpec):
                assert s.vertical >= 30 and s.slash >= 100
    with pytest.raises(ValueError, match="budget"):
        cand.candidate_space(300)
    assert cand.budget_for(32767, 0.1) == 1638
    assert cand.nominal_cost(DenseSpec()) == -1


def test_choose_respects_slack():
    assert cand.choose([0.9, 0.99, 0.95], [100, 400, 120], budget=100, slack=1.5) == 2
    assert cand.choose([0.9, 0.95], [100, 100], budget=100) == 1
    assert cand.choose([0.9, 0.9], [110, 100], budget=100) == 1  # tie: fewer keys
    assert cand.choose([0.9995, 1.0, 0.99], [100, 120, 90], budget=100) == 0  # within tol of the best: cheapest
    assert cand.choose([0.9, 0.99], [300, 200], budget=100) == 1  # none within: the cheapest


def test_full_attention_layers():
    from transformers import Gemma3TextConfig, LlamaConfig

    g = Gemma3TextConfig(num_hidden_layers=7, sliding_window_pattern=3)
    assert full_attention_layers(g) == [i for i, t in enumerate(g.layer_types) if t == "full_attention"]
    assert 0 < len(full_attention_layers(g)) < 7
    assert full_attention_layers(LlamaConfig(num_hidden_layers=3)) == [0, 1, 2]


def _byte_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<bos>": 0, "<eos>": 1, **{ch: i + 2 for i, ch in enumerate(sorted(alphabet))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")
    fast.save_pretrained(path)
    return len(vocab)


def save_tiny_gemma(path, *, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 32,
                    layer_types=("sliding_attention", "sliding_attention", "full_attention")):
    """A random Gemma-3 (hidden size 64, one layer per ``layer_types`` entry) with a byte tokenizer, saved as a model
    folder at ``path``; returns ``path``."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=_byte_tokenizer(path), hidden_size=64, intermediate_size=128,
                           num_hidden_layers=len(layer_types), num_attention_heads=num_heads,
                           num_key_value_heads=num_kv_heads, head_dim=head_dim, sliding_window=128,
                           layer_types=list(layer_types), max_position_embeddings=2048, query_pre_attn_scalar=head_dim)
    torch.manual_seed(0)
    Gemma3ForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """A random 3-layer Gemma-3 (sliding, sliding, full) with a byte tokenizer, saved as a model folder."""
    return save_tiny_gemma(tmp_path_factory.mktemp("tiny_gemma"))


def test_search_cli_end_to_end(tiny_gemma, tmp_path):
    from sgl_minference.tools.search.__main__ import main

    out = tmp_path / "cfg.json"
    report = main([str(tiny_gemma), "--output", str(out), "--length", "2048", "--budget", "512",
                   "--row-block", "512", "--device", "cpu", "--dtype", "float32", "--no-progress"])
    cfg = MInferenceConfig.load(out)
    assert json.loads(out.read_text())["format"] == "sgl-minference/v1"
    assert (cfg.num_layers, cfg.num_heads) == (3, 4)
    assert sorted(cfg.heads) == [2] and sorted(cfg.heads[2]) == [0, 1, 2, 3]
    assert cfg.head_spec(0, 0) == DenseSpec()  # sliding-window layers stay dense
    assert report["layers"] == [2] and len(report["heads"]) == 4
    for head in report["heads"]:
        assert len(head["candidates"]) == len(cand.candidate_space(512))
        assert all(0.0 <= c["recall"] <= 1.0 + 1e-6 for c in head["candidates"])
    assert json.loads(out.with_suffix(".report.json").read_text())["budget"] == 512
    assert report["budgets"] == [512] and report["target_recall"] is None
    assert all(isinstance(h["best"], int) for h in report["heads"])  # one budget, no target: every head sparse


def test_config_recall_dense_is_lossless(tiny_gemma):
    from transformers import AutoModelForCausalLM

    from sgl_minference.tools.search.searcher import config_recall

    model = AutoModelForCausalLM.from_pretrained(tiny_gemma, dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.randint(2, 200, (300,), generator=torch.Generator().manual_seed(0))
    dense = MInferenceConfig(default=DenseSpec())
    res = config_recall(model, ids, dense, layers=[1, 2], settings=ScoreSettings(row_block=128), progress=False)
    assert [(r.layer, r.head) for r in res] == [(l, h) for l in (1, 2) for h in range(4)]
    assert all(r.recall[0] == pytest.approx(1.0, abs=1e-5) for r in res)
    assert all(r.keys[0] == pytest.approx(301 / 2) for r in res)
    sparse = MInferenceConfig(default=AShapeSpec(sink=4, local=16))
    res = config_recall(model, ids, sparse, layers=[2], settings=ScoreSettings(row_block=128), progress=False)
    assert all(r.recall[0] < 1.0 for r in res)


def test_fit_slash_meets_budget():
    from sgl_minference.patterns.selection import Selection, fit_slash, lastq_indices, selection_keys

    n, d = 1024, 16
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(n, d, generator=gen) * 2.0, torch.randn(n, d, generator=gen)  # diffuse: scattered diagonals
    nominal = VerticalSlashSpec(vertical=30, slash=385)
    budget = 300
    fitted = fit_slash(nominal, q, k, budget, sm_scale=1.0, row_block=256, skip_rows=256)
    assert 100 <= fitted.slash < nominal.slash and fitted.vertical == 30

    def keys(spec):
        cols, offs = lastq_indices(q, k, sm_scale=1.0, vertical=spec.vertical, slash=spec.slash)
        return selection_keys(Selection(n=n, columns=cols, offsets=offs), row_block=256, skip_rows=256)

    assert keys(fitted) <= budget < keys(fitted.model_copy(update={"slash": fitted.slash + 1}))
    assert keys(nominal) > 2 * budget  # the nominal model assumed contiguous diagonals
    # a local head's diagonals are contiguous: the fitted count grows up to what the budget allows
    pos = torch.arange(n, dtype=torch.float64)
    theta = math.pi / n
    ql = torch.stack([torch.cos(theta * pos), torch.sin(theta * pos)], -1).float() * 2000.0
    kl = torch.stack([torch.cos(theta * pos), torch.sin(theta * pos)], -1).float()
    grown = fit_slash(VerticalSlashSpec(vertical=30, slash=100), ql, kl, budget, sm_scale=1.0,
                      row_block=256, skip_rows=256)
    assert grown.slash > 150


def test_dense_below_keeps_poor_heads_dense():
    from sgl_minference.tools.search.searcher import HeadResult, to_config

    specs = [AShapeSpec(sink=64, local=100), VerticalSlashSpec(vertical=30, slash=100)]
    results = [HeadResult(layer=1, head=0, specs=specs, recall=[0.3, 0.4], keys=[100, 100], best=1),
               HeadResult(layer=1, head=1, specs=specs, recall=[0.95, 0.9], keys=[100, 100], best=0)]
    cfg = to_config(results, num_layers=2, num_heads=2, dense_below=0.5, min_context=4096)
    assert cfg.head_spec(1, 0) == DenseSpec() and cfg.head_spec(1, 1) == specs[0]
    assert cfg.head_spec(0, 0) == DenseSpec() and cfg.min_context == 4096


def test_target_recall_takes_the_cheapest_candidate_meeting_it():
    from sgl_minference.tools.search.searcher import HeadResult, layer_summary, to_config

    # the costlier candidate has the higher recall, the cheapest misses: the middle one is the cheapest meeting it
    assert cand.cheapest_meeting([0.99, 0.96, 0.80], [1000, 400, 100], [1000, 400, 100], target=0.95) == 1
    assert cand.cheapest_meeting([0.99, 0.96, 0.80], [1000, 400, 100], [1000, 400, 100], target=0.97) == 0
    assert cand.cheapest_meeting([0.96, 0.97], [400, 400], [400, 400], target=0.95) == 1  # equal keys: recall
    assert cand.cheapest_meeting([0.90, 0.94], [100, 400], [100, 400], target=0.95) is None  # none: dense
    # slack: 300 keys on a 100-key budget is over 1.5 x its own budget, though cheaper than the 400-key one
    assert cand.cheapest_meeting([0.97, 0.96], [300, 450], [100, 400], target=0.95, slack=1.5) == 1
    assert cand.cheapest_meeting([0.97, 0.96], [300, 450], [100, 400], target=0.95, slack=3.0) == 0
    assert cand.cheapest_meeting([0.97], [601], [400], target=0.95, slack=1.5) is None
    # a candidate keeping as many keys as the head's causal rows gains nothing over the exact dense head
    assert cand.cheapest_meeting([0.97, 0.99], [300, 500], [300, 500], target=0.98, max_keys=500.0) is None
    assert cand.cheapest_meeting([0.97, 0.99], [300, 499], [300, 500], target=0.98, max_keys=500.0) == 1

    specs = [AShapeSpec(sink=64, local=100), VerticalSlashSpec(vertical=30, slash=400)]
    results = [HeadResult(layer=1, head=0, specs=specs, recall=[0.3, 0.4], keys=[100, 400], budgets=[100, 400],
                          best=None),
               HeadResult(layer=1, head=1, specs=specs, recall=[0.9, 0.99], keys=[100, 400], budgets=[100, 400],
                          best=1)]
    cfg = to_config(results, num_layers=2, num_heads=2)
    assert cfg.head_spec(1, 0) == DenseSpec() and cfg.head_spec(1, 1) == specs[1]
    assert layer_summary(results) == {1: pytest.approx((1.0 + 0.99) / 2)}  # the dense head is exact
    d = results[0].as_dict()
    assert d["best"] is None and d["dense"] is True and [c["budget"] for c in d["candidates"]] == [100, 400]
    assert results[1].as_dict()["dense"] is False


def test_score_layer_fits_each_candidate_to_its_own_budget():
    n, d = 1024, 16
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(n, d, generator=gen) * 2.0, torch.randn(n, d, generator=gen)  # diffuse: scattered diagonals
    qk = LayerQK(layer=0, q=q[None], k=k[None], sm_scale=1.0, softcap=None)
    nominal, budgets = VerticalSlashSpec(vertical=30, slash=385), [300, 450]
    res = score_layer(qk, lambda _l, _h: [nominal, nominal], ScoreSettings(row_block=256, skip_rows=256),
                      fit_budget=budgets)[0]
    assert res.budgets == budgets and res.specs[0].slash < res.specs[1].slash
    assert all(keys <= b for keys, b in zip(res.keys, budgets)) and res.keys[1] > budgets[0]
    dense = score_layer(qk, lambda _l, _h: [DenseSpec()], ScoreSettings(row_block=256, skip_rows=256))[0]
    assert res.causal_keys == dense.causal_keys == pytest.approx(dense.keys[0])  # what a dense head visits
    assert res.recall[0] < res.recall[1]


def _ladder_search(model, out, target, share=1.0):
    from sgl_minference.tools.search.__main__ import main

    return main([str(model), "--output", str(out), "--length", "2048", "--density", "0.75", "0.5",
                 "--target-recall", str(target), "--max-key-share", str(share),
                 "--row-block", "512", "--device", "cpu", "--dtype", "float32", "--no-progress"])


@pytest.mark.parametrize("target, share", [(0.5, 1.0), (0.9999, 1.0), (0.5, 0.3)])
def test_search_cli_target_over_a_ladder(tiny_gemma, tmp_path, capsys, target, share):
    out, slack = tmp_path / "cfg.json", 1.5
    report = _ladder_search(tiny_gemma, out, target, share)
    printed = capsys.readouterr().out
    cfg = MInferenceConfig.load(out)
    assert json.loads(out.with_suffix(".report.json").read_text()) == json.loads(json.dumps(report))
    assert report["budgets"] == [512, 768] and report["budget"] == 768 and report["target_recall"] == target
    assert report["max_key_share"] == share
    assert report["densities"] == pytest.approx([512 * 2 / 2049, 768 * 2 / 2049])
    n_cands = {b: len(cand.candidate_space(b)) for b in (512, 768)}
    cheaper_won = 0
    for head in report["heads"]:
        cands = head["candidates"]
        assert [c["budget"] for c in cands] == [512] * n_cands[512] + [768] * n_cands[768]
        assert head["causal_keys"] == (512 + 1 + 2048) / 2  # rows 512..2047 scored (skip: a quarter)
        ok = [i for i, c in enumerate(cands) if c["recall"] >= target and c["keys"] <= slack * c["budget"]
              and c["keys"] < share * head["causal_keys"]]
        spec = cfg.head_spec(2, head["head"])
        if head["best"] is None:
            assert not ok and head["dense"] and spec == DenseSpec()
        else:
            assert head["best"] in ok and not head["dense"]
            assert cands[head["best"]]["keys"] == min(cands[i]["keys"] for i in ok)
            assert spec.model_dump() == cands[head["best"]]["spec"]
            cheaper_won += cands[head["best"]]["recall"] < max(cands[i]["recall"] for i in ok)
        assert all(c["recall"] < 0.99 for c in cands)  # a random tiny model's attention is diffuse
    recalls = [1.0 if h["best"] is None else h["candidates"][h["best"]]["recall"] for h in report["heads"]]
    assert report["layer_recall"][2] == pytest.approx(sum(recalls) / 4)
    assert report["dense_heads"] == sum(h["dense"] for h in report["heads"])
    assert report["dense_heads"] / 4 <= report["key_share"] <= 1.0
    assert f"{report['dense_heads']} of 4 searched heads dense" in printed and "of causal" in printed
    if target > 0.99 or share < 0.4:  # unreachable, or every candidate keeps too many keys: every head dense
        assert report["dense_heads"] == 4 and report["key_share"] == 1.0 and set(recalls) == {1.0}
    else:  # every head meets it at some rung; somewhere a cheaper candidate beats a higher-recall one
        assert report["dense_heads"] == 0 and cheaper_won >= 1 and report["key_share"] < 0.75


@pytest.mark.parametrize("extra,words", [
    (["--density", "0.2", "0.4"], ["--density: 2 values need --target-recall"]),
    (["--budget", "512", "1024"], ["--budget: 2 values need --target-recall"]),
    (["--density", "0.2", "0.4", "--target-recall", "0.95", "--dense-below", "0.5"],
     ["--target-recall and --dense-below"]),
    (["--target-recall", "1.5"], ["--target-recall: 1.5 is not in (0, 1]"]),
    (["--calibration", "kv_retrieval", "haystack@0.5"], ["--calibration: unknown task 'haystack'"]),
    (["--calibration", "niah_single@1.5"], ["--calibration: depth '1.5'", "not a number in [0, 1]"]),
    (["--calibration", "niah_single@deep"], ["--calibration: depth 'deep'"]),
    (["--tail-rows", "-1"], ["--tail-rows: -1 is negative"]),
])
def test_search_cli_argument_errors(tmp_path, capsys, extra, words):
    from sgl_minference.tools.search.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "no-model"), "-o", str(tmp_path / "cfg.json"), *extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("python -m sgl_minference.tools.search: error: ") and all(w in err for w in words), err
    assert not (tmp_path / "cfg.json").exists()


@pytest.mark.parametrize("target, share", [(0.5, 1.0), (0.6, 0.5), (0.9999, 1.0)])
def test_rechoose_equals_a_fresh_search(tiny_gemma, tmp_path, capsys, target, share):
    from sgl_minference.tools.search.rechoose import main as rechoose

    source = tmp_path / "src.json"
    _ladder_search(tiny_gemma, source, 0.3, 1.0)
    fresh = _ladder_search(tiny_gemma, tmp_path / "fresh.json", target, share)
    out = tmp_path / "again.json"
    again = rechoose([str(source), "-o", str(out), "--target-recall", str(target), "--max-key-share", str(share)])
    assert "searched heads dense" in capsys.readouterr().out
    assert MInferenceConfig.load(out) == MInferenceConfig.load(tmp_path / "fresh.json")
    assert json.loads(out.with_suffix(".report.json").read_text()) == json.loads(json.dumps(again))
    assert again["rechosen_from"] == str(source) and again["target_recall"] == target
    for key in ("layer_recall", "dense_heads", "key_share", "budgets", "max_key_share"):
        assert json.loads(json.dumps(again[key])) == json.loads(json.dumps(fresh[key])), key
    assert [h["best"] for h in again["heads"]] == [h["best"] for h in fresh["heads"]]


@pytest.mark.parametrize("case, words", [
    ("no-report", ["--from-report", "No such file"]),
    ("not-search", ["was not written by the search"]),
    ("old-report", ["predates the heads' causal_keys"]),
    ("bad-target", ["--target-recall: 0.0 is not in (0, 1]"]),
])
def test_rechoose_errors(tmp_path, capsys, case, words):
    from sgl_minference.tools.search.rechoose import main as rechoose

    cfg = tmp_path / "cfg.json"
    MInferenceConfig(num_layers=3, num_heads=4, default=DenseSpec()).save(cfg)
    if case == "not-search":
        MInferenceConfig().save(cfg)
        cfg.with_suffix(".report.json").write_text(json.dumps({"heads": [], "budget": 512}))
    if case == "old-report":
        cfg.with_suffix(".report.json").write_text(json.dumps({"heads": [{"layer": 2, "head": 0}], "budget": 512}))
    target = "0.0" if case == "bad-target" else "0.9"
    with pytest.raises(SystemExit) as exc:
        rechoose([str(cfg), "-o", str(tmp_path / "new.json"), "--target-recall", target])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("python -m sgl_minference.tools.search.rechoose: error: "), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "new.json").exists()


def _needle_head(n: int = 1024, needle: int = 100, tail: int = 64):
    """One head whose rows attend their own neighbourhood (a rotating pair of dims), except the last ``tail`` rows,
    which attend key ``needle`` only (its own direction): a question reading one fact from far back."""
    pos = torch.arange(n, dtype=torch.float64)
    theta = math.pi / n
    rot = torch.stack([torch.cos(theta * pos), torch.sin(theta * pos)], -1)
    q, k = torch.zeros(n, 3, dtype=torch.float64), torch.zeros(n, 3, dtype=torch.float64)
    q[:, :2], k[:, :2] = rot * 2000.0, rot
    q[n - tail:, :2] = 0.0
    q[n - tail:, 2], k[needle, 2] = 50.0, 1.0
    return LayerQK(layer=0, q=q.float()[None], k=k.float()[None], sm_scale=1.0, softcap=None)


def test_tail_rows_score_the_question_apart():
    qk, n = _needle_head(), 1024
    a_shape, vs = AShapeSpec(sink=64, local=32), VerticalSlashSpec(vertical=64, slash=128)
    plain = score_layer(qk, lambda _l, _h: [a_shape, vs], ScoreSettings(row_block=256, skip_rows=256))[0]
    tailed = score_layer(qk, lambda _l, _h: [a_shape, vs], ScoreSettings(row_block=256, skip_rows=256,
                                                                        tail_rows=64))[0]
    assert plain.tail_recall is None and plain.score() == plain.recall
    assert tailed.recall == plain.recall and tailed.keys == plain.keys  # the tail adds a score, changes nothing else
    # A-shape misses the needle: over all rows that is the tail's 64 of 768 scored rows, on the tail all of it
    assert plain.recall[0] == pytest.approx(1 - 64 / (n - 256), abs=0.01) and tailed.tail_recall[0] < 0.01
    assert tailed.tail_recall[1] > 0.99  # vertical-slash's estimate (the last 64 rows) finds the needle column
    assert tailed.score() == [min(r, t) for r, t in zip(tailed.recall, tailed.tail_recall)]
    # at a 0.9 target the cheaper A-shape passes on the mean over rows, not once the question rows count
    plain.budgets = tailed.budgets = [256, 256]
    assert plain.keys[0] < plain.keys[1]
    assert meeting_target(plain, 0.9, 1.5, 1.0) == 0 and meeting_target(tailed, 0.9, 1.5, 1.0) == 1


def test_across_prompts_takes_the_lowest_recall_and_the_mean_keys():
    specs = [AShapeSpec(sink=64, local=100), VerticalSlashSpec(vertical=30, slash=100)]
    common = dict(layer=1, head=2, specs=specs, budgets=[200, 200], causal_keys=500.0)
    a = HeadResult(recall=[0.9, 0.99], keys=[100, 300], tail_recall=[0.95, 0.5], **common)
    b = HeadResult(recall=[0.8, 0.995], keys=[200, 100], tail_recall=[0.7, 0.9], **common)
    both = across_prompts([a, b])
    assert both.recall == [0.8, 0.99] and both.tail_recall == [0.7, 0.5] and both.keys == [150, 200]
    assert both.prompt_recall == [[0.9, 0.7], [0.5, 0.9]]  # each prompt's score: the lower of its two recalls
    assert both.score() == [min(p) for p in both.prompt_recall]
    assert (both.specs, both.budgets, both.causal_keys) == (specs, [200, 200], 500.0)
    assert across_prompts([a]) is a
    with pytest.raises(ValueError, match="per_prompt"):
        across_prompts([a, HeadResult(recall=[0.9], keys=[1], **{**common, "specs": specs[:1]})])
    d = both.as_dict()["candidates"][1]
    assert d["tail_recall"] == 0.5 and d["prompt_recall"] == [0.5, 0.9]


def test_search_cli_calibrates_on_several_prompts(tiny_gemma, tmp_path, capsys):
    from sgl_minference.tools.search.__main__ import main
    from sgl_minference.tools.search.rechoose import main as rechoose

    out = tmp_path / "cfg.json"
    report = main([str(tiny_gemma), "--output", str(out), "--length", "2048", "--density", "0.75", "0.5",
                   "--target-recall", "0.6", "--calibration", "kv_retrieval", "niah_single@0.2", "passkey@1",
                   "--tail-rows", "32", "--seed", "1000", "--row-block", "512", "--device", "cpu",
                   "--dtype", "float32", "--no-progress"])
    assert "calibration kv_retrieval niah_single@0.2 passkey@1, tail rows 32" in capsys.readouterr().out
    assert report["calibration"] == [{"task": "kv_retrieval", "depth": 0.5}, {"task": "niah_single", "depth": 0.2},
                                     {"task": "passkey", "depth": 1.0}]
    assert report["tail_rows"] == 32 and report["seed"] == 1000
    for head in report["heads"]:
        for c in head["candidates"]:
            assert len(c["prompt_recall"]) == 3
            assert min(c["prompt_recall"]) == pytest.approx(min(c["recall"], c["tail_recall"]))
        if head["best"] is not None:
            chosen = head["candidates"][head["best"]]
            assert min(chosen["recall"], chosen["tail_recall"]) >= 0.6
    assert report["dense_heads"] < 4  # some head was chosen sparse, so the check above ran
    # the prompts differ, so some candidate scores differently on them
    assert any(max(c["prompt_recall"]) - min(c["prompt_recall"]) > 1e-3
               for h in report["heads"] for c in h["candidates"])
    again = rechoose([str(out), "-o", str(tmp_path / "again.json"), "--target-recall", "0.6"])
    assert [h["best"] for h in again["heads"]] == [h["best"] for h in report["heads"]]
    assert MInferenceConfig.load(tmp_path / "again.json") == MInferenceConfig.load(out)


def test_search_cli_resumes_a_cut_off_run(tiny_gemma, tmp_path, monkeypatch, capsys):
    from sgl_minference.tools.search import searcher
    from sgl_minference.tools.search.__main__ import main

    base = [str(tiny_gemma), "--length", "2048", "--density", "0.75", "0.5", "--target-recall", "0.6",
            "--calibration", "kv_retrieval", "niah_single@0.2", "--tail-rows", "32", "--seed", "1000",
            "--row-block", "512", "--device", "cpu", "--dtype", "float32", "--no-progress"]
    fresh = main([*base, "-o", str(tmp_path / "fresh.json")])
    out = tmp_path / "cut.json"
    partial = out.with_suffix(".partial.jsonl")
    append, scored = searcher.Checkpoint.append, []

    def cut_after_five(self, prompt, res):  # the device call's time limit, in the middle of the second prompt
        if len(scored) == 5:
            raise KeyboardInterrupt
        scored.append((prompt, res.layer, res.head))
        append(self, prompt, res)

    monkeypatch.setattr(searcher.Checkpoint, "append", cut_after_five)
    with pytest.raises(KeyboardInterrupt):
        main([*base, "-o", str(out), "--resume"])
    assert len(partial.read_text().splitlines()) == 1 + 5 and not out.exists()
    assert [p for p, *_ in scored] == [0, 0, 0, 0, 1]
    rescored = []

    def count(self, prompt, res):
        rescored.append((prompt, res.layer, res.head))
        append(self, prompt, res)

    monkeypatch.setattr(searcher.Checkpoint, "append", count)
    resumed = main([*base, "-o", str(out), "--resume"])
    assert not partial.exists()
    assert sorted(rescored + scored) == [(p, 2, h) for p in (0, 1) for h in range(4)]  # only the missing three
    same = {k: v for k, v in resumed.items() if k != "seconds"} == {k: v for k, v in fresh.items() if k != "seconds"}
    assert same and MInferenceConfig.load(out) == MInferenceConfig.load(tmp_path / "fresh.json")
    # a checkpoint of another search is refused, naming the flag
    partial.write_text(json.dumps({"settings": {"seed": 1}}) + "\n")
    with pytest.raises(SystemExit) as exc:
        main([*base, "-o", str(out), "--resume"])
    assert exc.value.code == 2 and "--resume: checkpoint:" in capsys.readouterr().err
