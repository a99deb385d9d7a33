"""The README's Python tour runs: load a trained tiny SAE, splice it into its model, compare CE."""

from __future__ import annotations

import re
from pathlib import Path

from stages import train
from tests.conftest import make_config

README = Path(__file__).resolve().parents[1] / "README.md"


def _tour_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    tour = [b for b in blocks if "splice_saes" in b and "load_sae" in b]
    assert len(tour) == 1, "README.md should have exactly one ```python block that loads and splices an SAE"
    return tour[0]


def test_readme_python_tour_runs(tiny_cache, tmp_path, monkeypatch, capsys):
    cfg, cache = tiny_cache
    cfg = make_config(tmp_path, f"harvest.cache_dir={cfg.harvest.cache_dir}", f"harvest.model={cache.meta['model']}",
                      "train.n_epochs=1", "train.ce_eval_seqs=0")
    train.run(cfg, only=["topk-tok"], progress=False)
    monkeypatch.setenv("TSAE_SAE", str(tmp_path / "saes" / "topk-tok"))
    monkeypatch.chdir(tmp_path / "saes")  # the snippet must not depend on the working directory (absolute cache path)
    scope: dict = {}
    exec(compile(_tour_snippet(), str(README), "exec"), scope)
    out = capsys.readouterr().out
    m = re.search(r"L0 ([\d.]+)\s+NMSE ([\d.]+)\s+CE clean ([\d.]+)\s+spliced ([\d.]+)\s+added (-?[\d.]+)", out)
    assert m, out
    l0, nmse, clean, spliced, added = map(float, m.groups())
    assert 0 < l0 <= 8.0 + 1e-6  # k = 8 in configs/tiny.toml
    assert 0 < nmse < 1.0  # a trained SAE beats predicting the mean
    assert abs(added - (spliced - clean)) < 2e-3 and spliced != clean
