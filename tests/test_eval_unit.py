"""Eval harness pieces without a server: text metrics against hand-computed values, bootstrap and win-rate
statistics on synthetic data, percentiles, data loading, resume bookkeeping and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rouge_score import tokenizers

from loraplex.errors import LoraplexError
from loraplex.eval import metrics, runner, stats

# ---- metrics ------------------------------------------------------------------------------------------------


def test_rouge_hand_computed():
    # ref:  the cat sat on the mat   (6 tokens)      pred: the cat is on the mat (6 tokens)
    # unigram overlap: the x2, cat, on, mat = 5 -> P = R = F = 5/6
    # bigrams ref: the-cat cat-sat sat-on on-the the-mat; pred: the-cat cat-is is-on on-the the-mat -> 3/5
    # LCS: the cat on the mat = 5 -> 5/6
    scores = metrics.rouge("the cat is on the mat", "the cat sat on the mat")
    assert scores["rouge1"] == pytest.approx(5 / 6)
    assert scores["rouge2"] == pytest.approx(3 / 5)
    assert scores["rougeL"] == pytest.approx(5 / 6)
    assert scores["rougeLsum"] == pytest.approx(5 / 6)


def test_rouge_unequal_lengths_and_stemming():
    # pred: a b c (3), ref: a b c d e f (6) -> unigram P=1, R=1/2, F=2/3; stemming maps "cats" to "cat"
    assert metrics.rouge("alpha beta gamma", "alpha beta gamma delta eps zeta")["rouge1"] == pytest.approx(2 / 3)
    assert metrics.rouge("cats running", "cat run")["rouge1"] == pytest.approx(1.0)
    # LCS of "a b c d" vs "d c b a"-like reversal is 1 token -> P = R = 1/4
    assert metrics.rouge("one two three four", "four three two one")["rougeL"] == pytest.approx(1 / 4)


def test_rouge_lsum_splits_on_newlines():
    # Lsum takes the union LCS per reference sentence: with the sentences swapped, plain L only matches one
    # sentence (3 of 6 tokens) while Lsum matches both (6 of 6).
    pred, ref = "d e f\na b c", "a b c\nd e f"
    scores = metrics.rouge(pred, ref)
    assert scores["rougeL"] == pytest.approx(0.5)
    assert scores["rougeLsum"] == pytest.approx(1.0)


def test_tokenizer_equals_rouge_default_on_ascii():
    default = tokenizers.DefaultTokenizer(use_stemmer=True)
    ours = metrics.UnicodeTokenizer(use_stemmer=True)
    for text in ["The cats are running quickly, don't they?", "foo_bar 3.14 x-ray", "Hello   WORLD\nagain!!"]:
        assert ours.tokenize(text) == default.tokenize(text)


def test_non_ascii_text_is_scored():
    # The default tokenizer would see no tokens at all in these and score 0.
    assert metrics.rouge("Привет, мир!", "привет мир")["rouge1"] == pytest.approx(1.0)
    assert metrics.rouge("Le café est bon", "le café est très bon")["rouge1"] == pytest.approx(2 * 4 / 9)
    # Chinese: one token per character. pred 东京是首都 (5) vs ref 东京是日本的首都 (8): LCS 5 -> P=1, R=5/8
    assert metrics.rouge("东京是首都", "东京是日本的首都")["rougeL"] == pytest.approx(2 * 1 * (5 / 8) / (1 + 5 / 8))
    # Combining marks stay inside the word (Python's \w alone would cut Devanagari words apart).
    assert metrics.UnicodeTokenizer().tokenize("हिन्दी भाषा") == ["हिन्दी", "भाषा"]


def test_exact_match_normalises_whitespace_only():
    assert metrics.exact_match("  Paris\n is  nice ", "Paris is nice") == 1.0
    assert metrics.exact_match("paris is nice", "Paris is nice") == 0.0
    assert metrics.exact_match("Paris.", "Paris") == 0.0
    assert metrics.exact_match("caf\u0065\u0301", "caf\u00e9") == 1.0  # NFD vs NFC


def test_bleu_sanity():
    assert metrics.sentence_bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    assert metrics.sentence_bleu("completely unrelated words here", "the cat sat on the mat") == pytest.approx(0.0, abs=1e-6)
    partial = metrics.sentence_bleu("the cat is on the mat", "the cat sat on the mat")
    assert 0 < partial < 100
    assert metrics.corpus_bleu(["the cat sat on the mat", "a dog"], ["the cat sat on the mat", "a dog"]) == pytest.approx(100.0)


def test_score_sample_has_every_metric():
    assert set(metrics.score_sample("a b", "a b")) == set(metrics.TEXT_METRICS)


# ---- statistics ---------------------------------------------------------------------------------------------


def test_paired_bootstrap_detects_known_difference():
    rng = np.random.default_rng(1)
    a = rng.uniform(0.2, 0.6, size=200)
    true_diff = 0.1
    b = a + true_diff + rng.normal(0, 0.05, size=200)
    result = stats.paired_comparison(a, b, resamples=10_000, seed=0, names=("base", "tuned"))
    assert result["ci_low"] <= true_diff <= result["ci_high"]
    assert result["ci_low"] > 0
    assert result["verdict"] == "tuned better"
    assert result["n"] == 200
    # Same data the other way round: A better.
    assert stats.paired_comparison(b, a, seed=0, names=("base", "tuned"))["verdict"] == "base better"


def test_paired_bootstrap_zero_difference_contains_zero():
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 1, size=300)
    b = a + rng.normal(0, 0.1, size=300)  # noise around no difference
    b -= (b - a).mean()  # make the sample mean difference exactly zero
    result = stats.paired_comparison(a, b, seed=3)
    assert result["ci_low"] < 0 < result["ci_high"]
    assert result["verdict"] == "no significant difference"


def test_bootstrap_is_seeded_and_pairs_matter():
    values = np.linspace(-1, 2, 50)
    assert stats.bootstrap_mean_ci(values, seed=7) == stats.bootstrap_mean_ci(values, seed=7)
    # A shared per-sample offset much larger than the difference: paired CI stays narrow and excludes 0.
    base = np.arange(100, dtype=float)
    result = stats.paired_comparison(base, base + 0.5 + np.tile([-0.1, 0.1], 50))
    assert result["ci_low"] > 0.45 and result["ci_high"] < 0.55


def test_bootstrap_edge_cases():
    mean, low, high = stats.bootstrap_mean_ci([])
    assert np.isnan(mean) and np.isnan(low) and np.isnan(high)
    assert stats.paired_comparison([0.1], [0.9])["verdict"].startswith("too few paired samples")
    identical = stats.paired_comparison([0.5, 0.7, 0.1], [0.5, 0.7, 0.1])
    assert (identical["ci_low"], identical["ci_high"]) == (0.0, 0.0)
    assert identical["verdict"] == "no significant difference"


def test_win_counts_with_ties():
    counts = stats.win_counts([0.5, 0.5, 0.2, 0.9, 0.3], [0.6, 0.5, 0.2, 0.1, 0.3 + 1e-12])
    assert counts == {"wins": 1, "ties": 3, "losses": 1, "win_rate": 0.2}


def test_percentile_summary():
    summary = stats.percentile_summary(list(range(1, 101)) + [None])
    assert summary["n"] == 100
    assert summary["mean"] == pytest.approx(50.5)
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["p90"] == pytest.approx(90.1)  # linear interpolation between 90 and 91
    assert summary["p99"] == pytest.approx(99.01)
    assert stats.percentile_summary([])["n"] == 0


# ---- data, pairs, resume --------------------------------------------------------------------------------------


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = [
    json.dumps({"prompt": "What is 2+2?", "completion": "4"}),
    json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                             {"role": "assistant", "content": "Paris."}]}),
    json.dumps({"prompt": [{"role": "user", "content": "Say hi"}], "completion": [{"role": "assistant", "content": "hi"}]}),
]


def test_load_samples_reports_bad_lines(tmp_path):
    data = _write(tmp_path / "d.jsonl", [GOOD[0], "{not json", "", GOOD[1], json.dumps({"messages": [{"role": "user", "content": "x"}]}), GOOD[2]])
    samples, bad, digest = runner.load_samples(data)
    assert [s.line for s in samples] == [1, 4, 6]
    assert samples[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert samples[1].reference == "Paris."
    assert [(b["line"], b["reason"]) for b in bad] == [(2, "invalid_json"), (5, "no_assistant_turn")]
    assert len(digest) == 64


def test_sample_id_changes_with_the_line():
    assert runner.sample_id(3, GOOD[0]) == runner.sample_id(3, GOOD[0] + "  ")
    assert runner.sample_id(3, GOOD[0]) != runner.sample_id(3, GOOD[1])
    assert runner.sample_id(3, GOOD[0]) != runner.sample_id(4, GOOD[0])


def test_missing_data_file(tmp_path):
    with pytest.raises(LoraplexError, match="does not exist"):
        runner.load_samples(tmp_path / "nope.jsonl")


def test_comparison_pairs():
    assert runner.comparison_pairs(["base", "a"]) == [("base", "a")]
    assert runner.comparison_pairs(["base", "v1", "v2"]) == [("base", "v1"), ("base", "v2"), ("v1", "v2")]
    assert runner.comparison_pairs(["base", "v1", "v2"], "v2:v1") == [("v2", "v1")]
    with pytest.raises(LoraplexError, match="not in --models"):
        runner.comparison_pairs(["base", "v1"], "base:v9")
    with pytest.raises(LoraplexError, match="bad --compare"):
        runner.comparison_pairs(["base", "v1"], "base-v1")
    with pytest.raises(LoraplexError, match="listed twice"):
        runner.parse_models("base,a,base")


def test_read_records_skips_a_cut_line_and_keeps_the_last(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text(
        json.dumps({"model": "m", "sample_id": "1-x", "ok": False}) + "\n"
        + json.dumps({"model": "m", "sample_id": "1-x", "ok": True}) + "\n"
        + '{"model": "m", "sample_id": "2-y", "ok"'
    )
    records, broken = runner.read_records(path)
    assert records == {("m", "1-x"): {"model": "m", "sample_id": "1-x", "ok": True}}
    assert broken == 1


def test_settings_mismatch_refuses_to_resume(tmp_path):
    settings = {"max_tokens": 16, "seed": 0, "temperature": 0.0, "top_p": 1.0}
    runner.write_json(tmp_path / "results.json", {"settings": settings})
    runner._prepare_out_dir(tmp_path, settings, restart=False)  # same settings: fine
    with pytest.raises(LoraplexError, match=r"max_tokens: 16 -> 32") as e:
        runner._prepare_out_dir(tmp_path, {**settings, "max_tokens": 32}, restart=False)
    assert "--restart" in str(e.value) and "--out" in str(e.value)
    (tmp_path / "samples.jsonl").write_text("{}\n")
    runner._prepare_out_dir(tmp_path, {**settings, "max_tokens": 32}, restart=True)
    assert not (tmp_path / "samples.jsonl").exists() and not (tmp_path / "results.json").exists()


def _record(model, sample, output, ok=True, **extra):
    base = {"model": model, "sample_id": sample.sample_id, "line": sample.line, "ok": ok, "output": output,
            "reference": sample.reference, "ttft_ms": 10.0, "itl_ms": [1.0, 2.0], "e2e_ms": 13.0, "tpot_ms": 1.5,
            "prompt_tokens": 5, "completion_tokens": 3, "attempts": 1, "started_at": 100.0, "finished_at": 101.0,
            "error_type": None, "error_message": None, "status_code": None, "run_id": "r1"}
    return {**base, **extra}


def test_summarize_and_report(tmp_path):
    samples = [runner.Sample(f"{i}-h", i, [{"role": "user", "content": f"q{i}"}], f"answer number {i}") for i in range(1, 7)]
    records = {}
    for s in samples:
        records[("base", s.sample_id)] = _record("base", s, "something else")
        records[("tuned", s.sample_id)] = _record("tuned", s, s.reference)
    # One failure on the tuned side: the comparison must use the other 5 samples and say so.
    records[("tuned", "6-h")] = _record("tuned", samples[5], "", ok=False, error_type="http_500",
                                        error_message="boom", status_code=500, ttft_ms=None)
    summary = runner.summarize(samples, records, ["base", "tuned"], [("base", "tuned")], resamples=1000)
    tuned = summary["models"]["tuned"]
    assert (tuned["ok"], tuned["failed"], tuned["errors_by_type"]) == (5, 1, {"http_500": 1})
    assert tuned["metrics"]["exact_match"]["mean"] == 1.0
    assert tuned["throughput"]["wall_s"] == pytest.approx(1.0)
    assert tuned["throughput"]["output_tokens_per_s"] == pytest.approx(15.0)
    comparison = summary["comparisons"][0]
    assert comparison["n"] == 5
    assert comparison["verdict"] == "tuned better"
    assert comparison["metrics"]["rougeL"]["wins"] == 5
    assert summary["errors"][0]["model"] == "tuned" and summary["errors"][0]["line"] == 6

    from loraplex.eval.report import format_summary, write_reports

    results = {"settings": {"base_url": "http://x", "max_tokens": 16, "temperature": 0.0, "seed": 0, "concurrency": 2},
               "started_at": "t0", "finished_at": "t1", "server": {"models": [{"id": "base"}, {"id": "tuned", "parent": "base"}]},
               "data": {"path": "d.jsonl", "lines": 7, "valid": 6, "used": 6, "bad_lines": [{"line": 7, "reason": "invalid_json", "message": "bad"}],
                        "bad_by_reason": {"invalid_json": 1}}, **summary}
    written = write_reports(results, records, samples, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "tuned vs base" in md and "tuned better" in md and "http_500: 1" in md and "invalid_json" in md
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(written["plots"]) == 3
    assert all((tmp_path / p).stat().st_size > 0 for p in written["plots"])
    text = format_summary(results, tmp_path)
    assert "tuned vs base" in text and "failed requests: tuned 1" in text


def test_load_samples_line_breaks_and_encoding(tmp_path):
    # U+2028 inside a JSON string is one line for JSONL (str.splitlines would cut it); a non-UTF-8 line is bad.
    path = tmp_path / "d.jsonl"
    row = json.dumps({"prompt": "a\u2028b", "completion": "c\u0085d"}, ensure_ascii=False)
    path.write_bytes(row.encode() + b"\r\n" + b'{"prompt": "\xff", "completion": "x"}\n' + row.encode() + b"\n")
    samples, bad, _ = runner.load_samples(path)
    assert [s.line for s in samples] == [1, 3]
    assert samples[0].messages[0]["content"] == "a\u2028b"
    assert [(b["line"], b["reason"]) for b in bad] == [(2, "invalid_utf8")]
