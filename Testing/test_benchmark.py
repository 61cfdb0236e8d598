"""``universeg-slicer benchmark --quick`` runs and writes the documented JSON schema."""

import json

import pytest

from UniverSegLogic.benchmark import speed as benchmark
from UniverSegLogic.cli import main


@pytest.fixture(scope="module")
def quick_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    # fp32: the exactness check below is about the fast path's arithmetic, not bf16 rounding
    rc = main(
        ["benchmark", "--quick", "--device", "cpu", "--precision", "fp32", "--json", str(out)]
    )
    assert rc == 0
    return json.loads(out.read_text())


def test_quick_benchmark_schema(quick_json):
    r = quick_json
    assert isinstance(r["device"], str) and r["device"] == "cpu"
    for key in (
        "volume_propagation_s",
        "first_run_s",
        "rerun_after_one_edit_s",
        "mean_abs_prob_diff",
        "max_abs_prob_diff",
        "mask_agreement",
    ):
        assert isinstance(r[key], float), key
    assert r["volume_propagation_s"] > 0
    loop = r["volumes"][0]
    assert loop["rerun_identical_to_fresh"] is True  # the cached re-run == a new session
    assert loop["network_runs"]["rerun"] < loop["network_runs"]["fresh"]
    assert 0.0 <= r["mean_abs_prob_diff"] <= r["max_abs_prob_diff"] <= 1.0
    assert 0.0 <= r["mask_agreement"] <= 1.0
    rows = r["rows"]
    assert rows
    for row in rows:
        assert row["path"] in ("reference", "engine")
        assert isinstance(row["S"], int) and isinstance(row["batch"], int)
        assert isinstance(row["slices_per_s"], float) and row["slices_per_s"] > 0
        assert isinstance(row["peak_mem_mb"], float)
    # both paths for every S, measured in the same run
    by_s = {}
    for row in rows:
        by_s.setdefault(row["S"], set()).add(row["path"])
    assert len(by_s) >= 2 and all(v == {"reference", "engine"} for v in by_s.values())


def test_quick_benchmark_exactness(quick_json):
    # fp32 engine on the CPU: essentially exact against the reference
    assert quick_json["mean_abs_prob_diff"] <= 0.002
    assert quick_json["mask_agreement"] >= 0.999
    checks = quick_json["exactness"]["checks"]
    assert any("scaled" in k for k in checks)


def test_table_lists_every_row(quick_json):
    table = benchmark.format_table(quick_json)
    assert table.count("reference") >= 2 and table.count("engine") >= 2
    assert "volume propagation" in table


def test_sample_slices_available():
    sample, note = benchmark.load_sample()
    assert sample is not None, note
    cases = benchmark.sample_cases(
        sample, support=4, max_targets=3, segments=["right lung", "ribs"], size=64
    )
    assert len(cases) == 2
    for _name, t, si, sl in cases:
        assert t.shape[1:] == (1, 64, 64) and si.shape == sl.shape and si.shape[0] == 4
        assert float(sl.sum()) > 0 and 0.0 <= float(t.min()) and float(t.max()) <= 1.0
