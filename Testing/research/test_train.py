"""Tests of the training command (CPU, tiny synthetic slice stacks)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from UniverSegLogic.core.support import select_support
from UniverSegLogic.core.weights import verify_state_dict
from UniverSegResearch import train as tr

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    tr.write_synthetic_split(
        str(root / "train"), cases=3, axes=("axial", "coronal"), slices=24, size=16, seed=0
    )
    tr.write_synthetic_split(
        str(root / "val"), cases=1, axes=("axial",), slices=24, size=16, seed=7
    )
    return root


def small_config(data: Path, out: Path, **kw) -> tr.TrainConfig:
    base = dict(
        data=str(data),
        out=str(out),
        minutes=5.0,
        device="cpu",
        episodes=2,
        targets=1,
        synth_volumes=2,
        synth_depth=16,
        val_structures=2,
        log_every_s=0.0,
        val_every_s=1e9,
        checkpoint_every_s=1e9,
        warmup_steps=2,
        lr=1e-3,
        seed=0,
    )
    base.update(kw)
    return tr.TrainConfig(**base)


# ----------------------------------------------------------------------------- protocol
def test_labeled_positions_follow_the_evaluation_rule():
    assert tr.labeled_positions(10, 30, 1).tolist() == [20]
    assert tr.labeled_positions(10, 30, 2).tolist() == [15, 25]
    got = tr.labeled_positions(3, 40, 5)
    want = [3 + int(np.floor((i + 0.5) * 37 / 5 + 0.5)) for i in range(5)]
    assert got.tolist() == want
    rng = np.random.default_rng(0)
    for _ in range(200):
        z0 = int(rng.integers(0, 20))
        z1 = z0 + int(rng.integers(8, 40))
        k = int(rng.integers(1, 9))
        lab = tr.jittered_positions(z0, z1, k, 1, rng)
        assert len(np.unique(lab)) == k and lab.min() >= z0 and lab.max() <= z1
        assert np.abs(lab - tr.labeled_positions(z0, z1, k)).max() <= 1


def test_target_range_covers_extent_and_product_range():
    lab = tr.labeled_positions(10, 30, 2)  # 15, 25: typical gap 10
    assert tr.target_range(lab, 10, 30, 100, 2) == (5, 35)
    lab = tr.labeled_positions(10, 30, 8)  # gap ~2-3: extent +- 2 dominates
    lo, hi = tr.target_range(lab, 10, 30, 100, 2)
    assert lo <= 8 and hi >= 32
    assert tr.target_range(np.array([3]), 0, 6, 40, 2) == (0, 8)  # k=1: max(2, n//8) = 5


def test_sampler_respects_the_protocol(data):
    cfg = small_config(
        data, data / "unused", episodes=8, targets=3, p_cross=0.3, p_synthetic=0.3, max_support=4
    )  # S < k: bracketing order matters
    gen = torch.Generator().manual_seed(0)
    store = tr.load_split(str(data / "train"), "cpu", spare=cfg.synth_volumes * cfg.synth_depth)
    store.set_synthetic(*tr.synthetic_volumes(2, 16, store.size, gen, "cpu"), 20, 3, 4)
    sampler = tr.EpisodeSampler(store, cfg, np.random.default_rng(1))
    st, files = store.structures, store.files
    kinds_seen = set()
    saw_capped = False
    for _ in range(40):
        b = sampler.sample()
        assert b.idx.shape == (cfg.episodes * cfg.targets, b.support_size + 1)
        assert b.support_size == min(b.k, cfg.max_support) and 1 <= b.k <= cfg.max_k
        for r in range(len(b.idx)):
            ep = b.episode[r]
            a, s_ = b.target_structure[ep], b.support_structure[ep]
            fa, fs = files[st.file[a]], files[st.file[s_]]
            labeled = set(b.labeled[ep].tolist())
            kinds_seen.add(int(b.kind[ep]))
            assert len(labeled) == b.k
            if b.k > 4:
                saw_capped = True
            # labeled slices: inside the support structure's extent, in its file
            for g in labeled:
                assert fs.offset + st.z0[s_] <= g <= fs.offset + st.z1[s_]
            t = int(b.idx[r, 0])
            sup = [int(x) for x in b.idx[r, 1:]]
            assert fa.offset <= t < fa.offset + fa.n
            assert set(sup) <= labeled and len(set(sup)) == b.support_size
            assert b.ids[r, 0] == st.label[a] and (b.ids[r, 1:] == st.label[s_]).all()
            if b.kind[ep] == tr.KIND_CROSS:
                assert st.name[a] == st.name[s_] and fa.case != fs.case and fa.axis == fs.axis
                assert st.z0[a] <= t - fa.offset <= st.z1[a]
            else:
                assert s_ == a and t not in labeled
                lab_local = sorted(g - fa.offset for g in labeled)
                assert tuple(x - fa.offset for x in sup) == select_support(
                    t - fa.offset, lab_local, b.support_size
                )
                lo, hi = tr.target_range(
                    np.asarray(lab_local), int(st.z0[a]), int(st.z1[a]), fa.n, cfg.gap
                )
                assert lo <= t - fa.offset <= hi
            assert fa.synthetic == (b.kind[ep] == tr.KIND_SYNTHETIC)
    assert kinds_seen == {tr.KIND_OWN, tr.KIND_CROSS, tr.KIND_SYNTHETIC} and saw_capped


def test_some_targets_are_empty_slices_outside_the_structure(data):
    cfg = small_config(data, data / "unused", episodes=16, targets=3, p_synthetic=0.0, p_cross=0.0)
    store = tr.load_split(str(data / "train"), "cpu")
    sampler = tr.EpisodeSampler(store, cfg, np.random.default_rng(2))
    empty = total = 0
    for _ in range(10):
        b = sampler.sample()
        _, labels = tr.gather(store, b.idx, b.ids)
        has = labels[:, 0].flatten(1).any(1)
        empty += int((~has).sum())
        total += len(has)
    assert 0 < empty < total


def test_gather_binarizes_by_label_id(data):
    store = tr.load_split(str(data / "train"), "cpu")
    raw = np.load(data / "train" / "case0__axial.npz")["labels"]
    both = np.flatnonzero((raw == 1).any((1, 2)) & (raw == 2).any((1, 2)))
    z = int(both[len(both) // 2])  # a slice holding both structures
    off = store.files[[f.name for f in store.files].index("case0__axial")].offset
    images, labels = tr.gather(store, np.array([[off + z, off + z]]), np.array([[1, 2]]))
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1
    assert np.array_equal(labels[0, 0].numpy(), (raw[z] == 1).astype(np.float32))
    assert np.array_equal(labels[0, 1].numpy(), (raw[z] == 2).astype(np.float32))


def test_loader_drops_tiny_structures_and_builds_partners(data, tmp_path):
    tr.write_synthetic_split(str(tmp_path), cases=2, axes=("axial",), slices=24, size=16)
    p = tmp_path / "case0__axial.npz"
    z = dict(np.load(p))
    z["labels"] = z["labels"].copy()
    z["labels"][5, 0, 0] = 3  # one-voxel structure
    z["names"] = np.array(["organ", "lesion", "speck"])
    np.savez(p, **z)
    store = tr.load_split(str(tmp_path), "cpu")
    assert sorted(store.structures.label.tolist()) == [1, 1, 2, 2]
    assert store.images.dtype == torch.uint8 and store.labels.dtype == torch.int16
    for i, partners in enumerate(store.partners):
        assert len(partners) == 1
        j = int(partners[0])
        assert store.structures.name[j] == store.structures.name[i]
        files = [store.files[store.structures.file[x]] for x in (i, j)]
        assert files[0].case != files[1].case


# ----------------------------------------------------------------------------- device ops
def test_synthetic_volumes_hold_tapering_blobs():
    gen = torch.Generator().manual_seed(3)
    img, lab = tr.synthetic_volumes(4, 24, 32, gen, "cpu")
    assert img.shape == (4, 24, 32, 32) and img.dtype == torch.uint8
    assert lab.shape == img.shape and lab.dtype == torch.int16
    assert int(img.max()) > 200 and int(img.min()) < 50
    areas = (lab == 1).sum(dim=(2, 3))
    assert (areas.sum(1) > 0).all()  # blob 1 is always present
    for v in range(4):
        nz = torch.nonzero(areas[v]).flatten()
        a = areas[v, nz[0] : nz[-1] + 1].float()
        assert a.max() > a[0] and a.max() > a[-1] or len(a) <= 2  # shrinks towards its ends


def test_augment_moves_image_and_label_together():
    gen = torch.Generator().manual_seed(0)
    cfg = tr.TrainConfig(data="", out="", p_invert=0.0, p_task_affine=1.0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    mask = (((yy - 12) / 6) ** 2 + ((xx - 18) / 9) ** 2 < 1).float()
    labels = mask.expand(6, 3, 32, 32).clone()
    images = labels.clone()
    x, y = tr.augment(images, labels, cfg, gen)
    assert x.shape == y.shape == (6, 3, 32, 32)
    assert set(torch.unique(y).tolist()) <= {0.0, 1.0} and x.min() >= 0 and x.max() <= 1
    inter = ((x > 0.5) & (y > 0.5)).sum((2, 3)).float()
    union = ((x > 0.5) | (y > 0.5)).sum((2, 3)).float()
    assert (inter / union).min() > 0.85  # same geometry for image and label
    # the task transform is shared by a row: its slices agree far more than with other rows
    same = _iou(y[:, 0], y[:, 1]).mean()
    other = _iou(y[:, 0], y.roll(1, 0)[:, 1]).mean()
    assert same > 0.8 and same > other
    assert not torch.equal(y[:, 0], labels[:, 0])  # something did move


def _iou(a, b):
    inter = ((a > 0.5) & (b > 0.5)).sum((1, 2)).float()
    union = ((a > 0.5) | (b > 0.5)).sum((1, 2)).float().clamp_min(1)
    return inter / union


def test_loss_rewards_correct_and_empty_predictions():
    t = torch.zeros(2, 1, 8, 8)
    t[0, 0, 2:6, 2:6] = 1
    good = (t * 2 - 1) * 20
    assert tr.dice_bce_loss(good, t) < 0.01
    assert tr.dice_bce_loss(-good, t) > 1.0
    empty = torch.zeros(1, 1, 8, 8)
    assert tr.dice_bce_loss(torch.full((1, 1, 8, 8), -20.0), empty) < 0.01
    assert tr.dice_bce_loss(torch.full((1, 1, 8, 8), 5.0), empty) > 1.0


def test_validator_uses_the_product_protocol(data):
    cfg = small_config(data, data / "unused", val_structures=2)
    store = tr.load_split(str(data / "val"), "cpu")
    val = tr.Validator(store, cfg)
    assert sorted(set(val.episode_k)) == [2, 3, 5] and len(val.episode_k) == 6
    total = 0
    for s, (idx, _ids, _eps) in val.groups.items():
        assert idx.shape[1] == s + 1
        total += len(idx)
        assert not (idx[:, :1] == idx[:, 1:]).any()  # a target is never in its support
    assert total == val.rows

    class Const(torch.nn.Module):
        def __init__(self, v):
            super().__init__()
            self.v = v

        def forward(self, target, s_img, s_lab):
            return torch.full_like(target, self.v)

    assert val.evaluate(Const(-5.0))["val_dice"] == 0.0  # every episode has foreground
    hi = val.evaluate(Const(5.0))
    assert 0.0 < hi["val_dice"] < 1.0 and set(hi) == {
        "val_dice",
        "val_dice_k2",
        "val_dice_k3",
        "val_dice_k5",
    }


# ----------------------------------------------------------------------------- whole runs
def test_training_reduces_loss_on_an_easy_task(data, tmp_path):
    cfg = small_config(
        data,
        tmp_path / "run",
        max_steps=30,
        augment=False,
        p_synthetic=0.0,
        p_cross=0.0,
        episodes=4,
        targets=1,
        max_k=3,
        lr=2e-3,
        warmup_steps=3,
    )
    store = tr.load_split(str(data / "train"), "cpu")
    torch.manual_seed(0)
    sampler = tr.EpisodeSampler(store, cfg, np.random.default_rng(42))
    fixed = [sampler.sample() for _ in range(4)]

    def fixed_loss(model):
        with torch.no_grad():
            vals = []
            for b in fixed:
                im, lb = tr.gather(store, b.idx, b.ids)
                vals.append(float(tr.dice_bce_loss(tr._forward(model, im, lb), lb[:, :1])))
        return float(np.mean(vals))

    res = tr.train(cfg, echo=lambda s: None)
    assert res.run_steps == 30 and np.isfinite(res.final_loss)
    torch.manual_seed(0)
    model0 = tr.UniverSeg()  # the run's initial weights (same seed)
    trained = tr.UniverSeg()
    trained.load_state_dict(torch.load(tmp_path / "run" / "last.pt", weights_only=True))
    before, after = fixed_loss(model0), fixed_loss(trained)
    print("fixed-batch loss", before, after)
    assert after < 0.8 * before, (before, after)


def test_outputs_resume_and_weight_export(data, tmp_path):
    out = tmp_path / "a"
    cfg = small_config(data, out, max_steps=3, val_every=2)
    r1 = tr.train(cfg, echo=lambda s: None)
    assert r1.steps == 3 and r1.best_val is not None
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(tr.OUTPUT_FILES)  # nothing else (8-file limit)
    assert (out / "checkpoint.pt").stat().st_size < 16 * 2**20
    for name in ("best.pt", "last.pt"):
        sd = torch.load(out / name, weights_only=True)
        assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in sd.values())
        verify_state_dict(sd, origin=name)
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0] == "step,seconds,loss,val_dice,lr" and rows[-1].startswith("3,")
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"

    # full checkpoint: the step count continues, optimizer state comes back
    r2 = tr.train(replace(cfg, resume=str(out / "checkpoint.pt"), max_steps=2), echo=lambda s: None)
    assert r2.steps == 5 and r2.run_steps == 2
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 5 and ck["sessions"] == 2 and ck["optimizer"]["state"]
    assert (out / "log.csv").read_text().splitlines()[-1].startswith("5,")

    # plain weights: counting starts again, weights are the given ones
    rs = tr.load_resume(str(out / "last.pt"))
    assert not rs.full and rs.step == 0
    lr0 = tr.load_resume(str(out / "checkpoint.pt"))
    assert lr0.full and lr0.step == 5
    for k, v in rs.state_dict.items():
        assert torch.equal(v, lr0.state_dict[k])
    r3 = tr.train(
        replace(cfg, out=str(tmp_path / "b"), resume=str(out / "last.pt"), max_steps=1, lr=0.0),
        echo=lambda s: None,
    )
    assert r3.steps == 1
    after = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for k, v in rs.state_dict.items():  # lr 0 (AdamW decay scales with lr): unchanged
        assert torch.equal(v, after[k])


def test_resume_rejects_a_foreign_file(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(Exception, match="wrong architecture"):
        tr.load_resume(str(bad))


def test_cli_and_light_imports(data, tmp_path):
    code = (
        "import sys, UniverSegResearch.train, UniverSegResearch.cli.train; "
        "bad = [m for m in ('SimpleITK', 'slicerio', 'vtk', 'slicer', 'nrrd', 'matplotlib') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    from UniverSegResearch import cli

    assert (
        cli.main(
            [
                "train",
                "--data",
                str(tmp_path / "missing"),
                "--out",
                str(tmp_path / "o"),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    from UniverSegResearch.cli import train as train_cmd

    assert (
        train_cmd.main(
            [
                "--data",
                str(data),
                "--out",
                str(tmp_path / "o2"),
                "--device",
                "cpu",
                "--max-steps",
                "1",
                "--episodes",
                "1",
                "--targets",
                "1",
                "--synth-volumes",
                "1",
                "--synth-depth",
                "8",
                "--val-structures",
                "1",
            ]
        )
        == 0
    )
    assert (tmp_path / "o2" / "best.pt").is_file()
