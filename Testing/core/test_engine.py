"""InferenceEngine: the fast path equals the reference forward pass; batching and memory sizing."""

import os

import pytest
import torch

from UniverSegLogic.core import engine as eng_mod
from UniverSegLogic.core.engine import (
    InferenceEngine,
    engine_flops,
    estimate_bytes_per_target,
    reference_flops,
)
from UniverSegLogic.core.model import EmptySupportError, UniverSeg


def _model(seed=0, out_scale=1.0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = UniverSeg().eval()
    if out_scale != 1.0:
        with torch.no_grad():
            m.out_conv.conv.weight.mul_(out_scale)
    return m.to(dtype)


def _data(b, s, size=64, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(b, 1, size, size, generator=g, dtype=dtype)
    si = torch.rand(s, 1, size, size, generator=g, dtype=dtype)
    # blobby labels so that the support stream carries structure
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r = torch.rand(s, 1, 1, 1, generator=g) * 0.5 + 0.2
    sl = ((yy**2 + xx**2)[None, None] < r**2).to(dtype)
    return t, si, sl


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1 if os.environ.get("OMP_NUM_THREADS") == "1" else min(n, 2))
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("s,b,size", [(1, 1, 64), (2, 3, 64), (5, 2, 32), (16, 2, 32), (3, 1, 128)])
def test_fast_fp32_matches_reference_logits(s, b, size):
    m = _model()
    t, si, sl = _data(b, s, size)
    ref = m.forward_shared(t, si, sl)
    out = InferenceEngine(m, "cpu", precision="fp32").logits(t, si, sl)
    assert out.shape == (b, 1, size, size) and out.dtype == torch.float32
    assert (out - ref).abs().max().item() <= 1e-4
    assert ref.std().item() > 1e-3  # the check is not vacuous: outputs vary


def test_fast_fp32_matches_reference_with_scaled_output():
    m = _model(seed=3, out_scale=20.0)
    t, si, sl = _data(2, 4, 64, seed=5)
    ref = m.forward_shared(t, si, sl)
    assert ref.std().item() > 1.0
    out = InferenceEngine(m, "cpu", precision="fp32").logits(t, si, sl)
    assert (out - ref).abs().max().item() <= 1e-3 * max(1.0, ref.abs().max().item())
    p_ref, p_out = torch.sigmoid(ref), torch.sigmoid(out)
    assert (p_out - p_ref).abs().mean().item() < 1e-5
    assert ((p_out > 0.5) == (p_ref > 0.5)).float().mean().item() >= 0.9999


@pytest.mark.parametrize("s,b", [(1, 1), (4, 2), (7, 3)])
def test_fast_fp64_matches_reference_in_float64(s, b):
    m = _model()
    t, si, sl = _data(b, s, 32, dtype=torch.float64)
    ref = m.double().forward_shared(t, si, sl)
    e = InferenceEngine(_model(), "cpu", precision="fp64")
    out = e.raw_logits(t, si, sl)
    assert out.dtype == torch.float64
    assert (out - ref).abs().max().item() <= 1e-9


def test_reference_mode_is_the_models_forward_pass():
    m = _model()
    t, si, sl = _data(2, 3, 32)
    e = InferenceEngine(m, "cpu", mode="reference")
    assert torch.equal(e.logits(t, si, sl), m.forward_shared(t, si, sl))


def test_support_permutation_invariance():
    m = _model()
    t, si, sl = _data(2, 6, 32)
    e = InferenceEngine(m, "cpu", precision="fp32")
    a = e.logits(t, si, sl)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    b = e.logits(t, si[perm], sl[perm])
    assert (a - b).abs().max().item() <= 1e-4  # summation order only
    # and different from a different support set (the check can fail)
    c = e.logits(t, si.flip(-1), sl)
    assert (a - c).abs().max().item() > 1e-3


def test_empty_support_raises_clear_error():
    e = InferenceEngine(_model(), "cpu")
    t = torch.rand(2, 1, 32, 32)
    empty = torch.zeros(0, 1, 32, 32)
    with pytest.raises(EmptySupportError, match="support set is empty"):
        e.logits(t, empty, empty)
    with pytest.raises(ValueError):
        e.logits(t, torch.rand(2, 1, 32, 32), torch.rand(3, 1, 32, 32))


def test_empty_target_batch():
    e = InferenceEngine(_model(), "cpu")
    t, si, sl = _data(1, 2, 32)
    assert e.logits(t[:0], si, sl).shape == (0, 1, 32, 32)


def test_sub_batches_from_memory_budget_give_same_result():
    m = _model()
    t, si, sl = _data(5, 3, 32)
    full = InferenceEngine(m, "cpu", precision="fp32").logits(t, si, sl)
    small = InferenceEngine(m, "cpu", precision="fp32", memory_budget_mb=0.001)
    assert small.max_batch(3, 32, 32) == 1
    calls = []
    orig = small._fast_checked

    def spy(chunk, a, b):
        calls.append(chunk.shape[0])
        return orig(chunk, a, b)

    small._fast_checked = spy
    out = small.logits(t, si, sl)
    assert calls == [2, 2, 2]  # sub-batches of at least 2: the last target runs beside a copy
    assert torch.equal(out, full)


def test_a_targets_logits_do_not_depend_on_the_targets_beside_it():
    """Batch invariance on the CPU (the Propagator's cache relies on it): one target alone, in
    pairs, or in a batch of 7 gives the same bits."""
    m = _model()
    t, si, sl = _data(7, 2, 64)
    e = InferenceEngine(m, "cpu", precision="fp32")
    full = e.logits(t, si, sl)
    for parts in ([1] * 7, [1, 6], [3, 4], [2, 2, 3]):
        outs, i = [], 0
        for n in parts:
            outs.append(e.logits(t[i : i + n], si, sl))
            i += n
        assert torch.equal(torch.cat(outs), full), parts


def test_support_cache_follows_new_and_edited_support():
    m = _model()
    t, si, sl = _data(2, 3, 32)
    e = InferenceEngine(m, "cpu", precision="fp32")
    first = e.logits(t, si, sl)
    si2 = si.clone()
    si2[0] = 1 - si2[0]
    assert (e.logits(t, si2, sl) - m.forward_shared(t, si2, sl)).abs().max() <= 1e-4
    si.mul_(0.5)  # edited in place: the cached features must not be reused
    assert (e.logits(t, si, sl) - m.forward_shared(t, si, sl)).abs().max() <= 1e-4
    assert (e.logits(t, si, sl) - first).abs().max() > 1e-4


def test_engine_sees_weights_edited_after_creation():
    m = _model()
    t, si, sl = _data(1, 2, 32)
    e = InferenceEngine(m, "cpu", precision="fp32")
    before = e.logits(t, si, sl)
    with torch.no_grad():
        m.dec_blocks[1].cross.cross_conv.weight.mul_(1.5)
    after = e.logits(t, si, sl)
    assert (after - before).abs().max() > 1e-4
    assert (after - m.forward_shared(t, si, sl)).abs().max() <= 1e-4


def test_batch_sizing_for_a_512x512x600_job():
    """Every slice goes through the 128x128 canvas: memory per target depends on S only."""
    e = InferenceEngine(_model(), "cpu", precision="fp32", memory_budget_mb=2048)
    budget = 2048 * 2**20
    sizes = []
    for s in (1, 8, 16, 64):
        n = e.max_batch(s)
        per = e.bytes_per_target(s)
        assert 1 <= n <= 600
        assert n * per <= budget
        sizes.append(n)
        # the whole 600-slice job in sub-batches never holds more than the budget
        assert per * min(n, 600) <= budget
    assert sizes == sorted(sizes, reverse=True)  # more support -> smaller batches
    assert sizes[-1] < sizes[0]
    # a big (GPU-like) budget allows larger batches, a tiny one still gives 1
    assert e.max_batch(64, budget_bytes=40 * 2**30) >= sizes[-1]
    assert e.max_batch(64, budget_bytes=1) == 1
    # estimates grow linearly in S and are in a sane range (fp32, 128x128): tens of MiB per
    # target at S=1, a few hundred MiB at S=64; the reference path needs far more
    assert 10 * 2**20 < estimate_bytes_per_target(1) < 200 * 2**20
    assert 100 * 2**20 < estimate_bytes_per_target(64) < 1024 * 2**20
    assert estimate_bytes_per_target(64, mode="reference") > 4 * estimate_bytes_per_target(64)


def test_default_budget_uses_available_ram():
    e = InferenceEngine(_model(), "cpu")
    b = e.memory_budget_bytes()
    assert 0 < b <= 6 * 2**30
    assert b <= eng_mod.available_ram_bytes()


def test_precision_comes_from_what_the_machine_is_and_explicit_options(monkeypatch):
    """No timing: the rule reads CPU features; UNIVERSEG_CPU_BF16=0/1 sets what auto means; an
    explicit precision overrides both."""
    assert eng_mod.cpu_bf16_rule({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})[0] is True
    assert eng_mod.cpu_bf16_rule({"avx512f", "avx512_bf16"})[0] is True
    assert eng_mod.cpu_bf16_rule({"avx2"})[0] is False
    assert eng_mod.cpu_bf16_rule(set())[0] is False
    monkeypatch.delenv("UNIVERSEG_CPU_BF16", raising=False)
    monkeypatch.setattr(eng_mod, "_BF16_CHOICE", None)
    use, why = eng_mod.cpu_bf16_rule()
    e = InferenceEngine(_model(), "cpu")
    assert e.precision == ("bf16" if use else "fp32") and e.precision_reason == why
    for value, expected in (("0", "fp32"), ("1", "bf16")):
        monkeypatch.setenv("UNIVERSEG_CPU_BF16", value)
        e = InferenceEngine(_model(), "cpu")
        assert e.precision == expected and f"UNIVERSEG_CPU_BF16={value}" in e.precision_reason
        assert e.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[expected]
    for asked in ("fp32", "bf16"):  # an explicit precision wins over the variable
        e = InferenceEngine(_model(), "cpu", precision=asked)
        assert e.precision == asked and e.precision_reason.startswith("requested")
    monkeypatch.setenv("UNIVERSEG_CPU_BF16", "0")
    eng_mod.set_cpu_bf16_choice(True, "cohort setting")  # a cohort worker takes the client's
    try:
        assert InferenceEngine(_model(), "cpu").precision == "bf16"
    finally:
        monkeypatch.setattr(eng_mod, "_BF16_CHOICE", None)
    with pytest.raises(ValueError):
        InferenceEngine(_model(), "cpu", precision="int8")
    with pytest.raises(ValueError):
        InferenceEngine(_model(), "cpu", mode="fastest")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_logits_do_not_depend_on_the_thread_count_or_the_batch(precision):
    """oneDNN chooses its kernels from the batch size and the thread count, and some add in
    another order (measured: the 1x1 output convolution, fp32, a batch of 16 on one thread). A
    cohort worker on one thread must give the bits of the CLI on two."""
    m = _model()
    t, si, sl = _data(16, 2, 32)
    e = InferenceEngine(m, "cpu", precision=precision)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(e.logits(t, si, sl))
        results.append(torch.cat([e.logits(t[i : i + 2], si, sl) for i in range(0, 16, 2)]))
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_bf16_path_runs_and_is_close():
    """bf16 runs wherever torch has bf16 convolutions; it is approximate."""
    m = _model()
    t, si, sl = _data(2, 3, 32)
    e = InferenceEngine(m, "cpu", precision="fp32")
    e.precision, e.dtype = "bf16", torch.bfloat16  # force, whatever the CPU
    out = e.logits(t, si, sl)
    ref = m.forward_shared(t, si, sl)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().mean().item() < 0.1 * ref.abs().mean().item() + 0.05


def test_flop_counts_match_the_published_figures():
    assert reference_flops(64) / 1e9 == pytest.approx(667.6, abs=0.1)
    assert reference_flops(16) / 1e9 == pytest.approx(169.3, abs=0.1)
    # the fast path's count: a few times less, still linear in S
    # (support-set work shared by a batch of 16 targets)
    assert engine_flops(64, 16) < reference_flops(64, official=False) / 4
    assert engine_flops(16, 16) < reference_flops(16, official=False) / 3
    assert engine_flops(64) - engine_flops(32) == pytest.approx(
        2 * (engine_flops(32) - engine_flops(16)), rel=1e-9
    )
    assert engine_flops(16, 16) < engine_flops(16, 1)


def test_pipeline_interface():
    e = InferenceEngine(_model(), "cpu", batch_size=3)
    assert e.batch_size == 3 and e.device == "cpu" and isinstance(e.model, UniverSeg)
    assert InferenceEngine(_model(), "cpu").batch_size >= 1
    assert "cpu" in e.describe()


def test_compile_is_opt_in_and_falls_back_without_a_compiler(monkeypatch):
    m = _model()
    t, si, sl = _data(4, 16, 32)
    assert InferenceEngine(m, "cpu").compile is False
    monkeypatch.setattr(eng_mod, "has_cxx_compiler", lambda: False)
    e = InferenceEngine(m, "cpu", precision="fp32", compile=True)
    small = e.logits(t[:1], si[:2], sl[:2])  # tiny job: never compiled
    assert "not compiled yet" in e.describe()
    out = e.logits(t, si, sl)  # large job: would compile, but there is no compiler
    assert "no C++ compiler" in e.describe()
    assert (out - m.forward_shared(t, si, sl)).abs().max().item() <= 1e-4
    assert small.shape == (1, 1, 32, 32)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    m = _model()
    t, si, sl = _data(4, 16, 32)
    monkeypatch.setattr(eng_mod, "has_cxx_compiler", lambda: True)

    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("inductor exploded")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    e = InferenceEngine(m, "cpu", precision="fp32", compile=True)
    out = e.logits(t, si, sl)
    assert "failed" in e.describe()
    assert (out - m.forward_shared(t, si, sl)).abs().max().item() <= 1e-4
