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


def test_clinical_benchmark_quick_variant_writes_every_documented_field(tmp_path):
    """``benchmark --clinical --quick``: the clinical benchmark's code on a 48x48x24 variant of
    its volume (the 512x512x400 figures come from the benchmark itself, never from a test)."""
    out = tmp_path / "clinical.json"
    assert (
        main(["benchmark", "--clinical", "--quick", "--precision", "fp32", "--json", str(out)]) == 0
    )
    r = json.loads(out.read_text())
    assert r["kind"] == "clinical" and r["quick"] is True
    assert r["device"] == "cpu" and r["precision"] == "fp32" and r["precision_reason"]
    assert r["volume"]["shape_kji"] == [24, 48, 48] and r["volume"]["dtype"] == "int16"
    one, three = r["cases"]
    assert one["segments"] == ["right lung"] and len(three["segments"]) == 3
    assert len(one["first_run_s_each"]) == 2 and len(one["fill_between_slices_s_each"]) == 2
    for case in (one, three):
        for key in (
            "first_run_s",
            "rerun_after_one_edit_s",
            "fill_between_slices_s",
            "first_run_vs_fbs",
            "rerun_vs_fbs",
            "write_seg_nrrd_s",
            "peak_rss_mb",
            "peak_rss_added_mb",
            "rss_before_mb",
            "rerun_peak_rss_mb",
        ):
            assert isinstance(case[key], float), key
        assert case["first_run_s"] > 0 and case["fill_between_slices_s"] > 0
        assert case["first_run_vs_fbs"] == pytest.approx(
            case["first_run_s"] / case["fill_between_slices_s"]
        )
        assert case["peak_rss_mb"] >= case["rss_before_mb"] > 0
        assert case["precision"] == "fp32"
        for name in case["segments"]:
            assert len(case["labeled_slices"][name]) == 5
            for value in case["dice"][name].values():
                assert 0.0 < value <= 1.0
        assert case["network_runs"]["rerun"] < case["network_runs"]["first"]
        assert case["repeats_identical"] is True  # the same masks in every timed run
        assert case["first_run_cpu_s"] > 0 and case["fill_between_slices_cpu_s"] > 0
    assert r["cli"]["wall_s"] > 0 and "universeg-slicer propagate" in r["cli"]["command"]
    assert r["annotation_loop_256"]["rerun_identical_to_fresh"] is True
