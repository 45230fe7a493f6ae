"""benchmarks/seed_spread.py: seeds are read from draft names, τ is pooled across files of one run only when it
agrees, and the difference of means and the spread are computed from the right seeds."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # as when the script runs: it imports draft_gain from its folder
spec = importlib.util.spec_from_file_location("seed_spread", ROOT / "benchmarks" / "seed_spread.py")
seed_spread = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed_spread)


def bench(path: Path, taus: dict[str, float], same_as_ar: str = "4/4") -> str:
    rows = [{"decoder": "ar", "draft": "-", "tau": 1.0, "identical_to_ar": "ref"}]
    rows += [{"decoder": "sd chain4", "draft": d, "tau": t, "identical_to_ar": same_as_ar} for d, t in taus.items()]
    path.write_text(json.dumps({"run": "runs/x", "users": 4, "rows": rows}))
    return str(path)


def test_seed_names():
    assert seed_spread.seed_of("hass", "hass") == 0
    assert seed_spread.seed_of("hass-seed12", "hass") == 12
    assert seed_spread.seed_of("padrec-hass-seed1", "hass") is None
    assert seed_spread.seed_of("hass-warm", "hass") is None


def test_pooled_means_and_spread(tmp_path):
    a = bench(tmp_path / "a.json", {"hass": 4.0, "padrec-hass": 3.0, "hass-warm": 9.0})
    b = bench(tmp_path / "b.json", {"hass": 4.0, "hass-seed1": 6.0, "padrec-hass-seed1": 5.0})
    rows = seed_spread.spread(seed_spread.collect([a, b]), "padrec-hass", "hass")
    assert len(rows) == 1
    r = rows[0]
    assert r["mean τ hass"] == 5.0 and r["mean τ padrec-hass"] == 4.0
    assert r["Δτ of means %"] == -20.0
    assert r["spread hass %"] == pytest.approx(100 * 2 ** 0.5 / 5, abs=0.05)
    summary = seed_spread.summary(rows)
    assert summary[0]["above base"] == 0 and summary[0]["configs"] == 1


def test_refuses_disagreeing_tau_and_lists_unlike_ar(tmp_path):
    a = bench(tmp_path / "a.json", {"hass": 4.0})
    b = bench(tmp_path / "b.json", {"hass": 4.5})
    with pytest.raises(SystemExit, match="earlier file"):
        seed_spread.collect([a, b])
    c = bench(tmp_path / "c.json", {"hass": 4.0}, same_as_ar="3/4")
    with pytest.raises(SystemExit, match="differs from AR"):
        seed_spread.collect([c])


def test_one_seed_is_not_enough(tmp_path):
    a = bench(tmp_path / "a.json", {"hass": 4.0, "padrec-hass": 3.0})
    assert seed_spread.spread(seed_spread.collect([a]), "padrec-hass", "hass") == []
