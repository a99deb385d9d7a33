import json

from click.testing import CliRunner

import cli
from tests.conftest import PYDOC, TINY


def _sets(tmp):
    return ["--set", f"harvest.cache_dir={tmp / 'cache'}", "--set", f"train.out_dir={tmp / 'saes'}",
            "--set", f"analyze.out_dir={tmp / 'analysis'}", "--set", f"harvest.dataset={PYDOC}",
            "--set", "harvest.n_tokens=16000"]


def test_run_end_to_end_on_tiny_llama(tmp_path):
    r = CliRunner().invoke(cli.main, ["run", str(TINY), *_sets(tmp_path), "--set", "harvest.model=tiny-llama"])
    assert r.exit_code == 0, r.output
    assert "held-out evaluation" in r.output and "topk-tok" in r.output and "wall time" in r.output
    assert "harvest nan" not in r.output and "tokens/s)" in r.output  # the harvest's speed (it did model work)
    from pipeline.config import ANALYSES

    res = json.loads((tmp_path / "analysis" / "results.json").read_text())
    assert set(res) >= set(ANALYSES)  # every analysis ran on the tiny config
    for png in ("ngram_rank_frequency.png", "mse_by_frequency.png", "unigram_feature_counts.png"):
        assert (tmp_path / "analysis" / png).stat().st_size > 1000
    md = (tmp_path / "analysis" / "report.md").read_text()
    assert "Unigram-activation" in md and "n-gram statistics" in md
    assert md.count("## ") >= len(ANALYSES) + 1  # contents + one heading per analysis
    assert md.count("*Figure ") == md.count("![")  # every figure has its caption line
    html = (tmp_path / "analysis" / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert (tmp_path / "analysis" / "browser" / "index.html").is_file()
    s = json.loads((tmp_path / "saes" / "summary.json").read_text())
    assert {r["name"] for r in s["results"]} == {"topk", "topk-tok", "topk-s1", "topk-small"}


def test_stage_commands_separately_and_errors(tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli.main, ["train", str(TINY), *_sets(tmp_path)])
    assert r.exit_code == 2 and "cli.py harvest" in r.output  # no cache yet: says what to run
    r = runner.invoke(cli.main, ["harvest", str(TINY), *_sets(tmp_path)])
    assert r.exit_code == 0 and f"cache: {tmp_path / 'cache'}" in r.output
    r = runner.invoke(cli.main, ["harvest", str(TINY), *_sets(tmp_path), "--set", "harvest.nope=1"])
    assert r.exit_code == 2 and "unknown key" in r.output


def test_run_summary_with_a_complete_cache(tmp_path, monkeypatch):
    """When the cache was already complete (no model work), the summary says so instead of a speed."""
    from stages import analyze, harvest, train

    monkeypatch.setattr(harvest, "run", lambda cfg: {"path": "c", "n_seq": 2, "tokens": 512, "seconds": 0.0,
                                                     "tokens_per_s": float("nan")})
    monkeypatch.setattr(train, "run", lambda cfg: {"out_dir": "s", "results": []})
    monkeypatch.setattr(analyze, "run", lambda cfg: {"out_dir": "a", "report": "a/report.md",
                                                     "report_html": "a/report.html"})
    r = CliRunner().invoke(cli.main, ["run", str(TINY), *_sets(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "(512 tokens; already complete, no model work)" in r.output and "nan" not in r.output
