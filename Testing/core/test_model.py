"""The v1 network: checkpoint layout and the properties of the released model."""

from pathlib import Path

import pytest
import torch

from UniverSegLogic.core.model import EmptySupportError, UniverSeg, parameter_count

TSV = Path(__file__).resolve().parents[1] / "reference" / "universeg_v1_state_dict.tsv"


def _official_layout():
    rows = {}
    for line in TSV.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, count = line.split("\t")
        rows[key] = (tuple(int(x) for x in shape.strip("()").split(",") if x.strip()), int(count))
    return rows


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(0)
    return UniverSeg().double().eval()


def test_state_dict_matches_official_layout():
    official = _official_layout()
    sd = UniverSeg().state_dict()
    assert list(sd) == list(official), "key names and order must match the released checkpoint"
    for k, (shape, count) in official.items():
        assert tuple(sd[k].shape) == shape, k
        assert sd[k].numel() == count, k
    assert len(sd) == 44
    assert parameter_count(UniverSeg()) == 1_182_785
    assert not list(UniverSeg().buffers())


def test_official_key_file_loads_strict(tmp_path):
    """A file holding exactly the official keys (as the released .pt) loads with strict=True."""
    official = _official_layout()
    state = {k: torch.randn(shape) for k, (shape, _) in official.items()}
    path = tmp_path / "universeg_v1_nf64_ss64_STA.pt"
    torch.save(state, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    m = UniverSeg()
    m.load_state_dict(loaded, strict=True)
    assert torch.equal(
        m.enc_blocks[2].cross.cross_conv.weight, state["enc_blocks.2.cross.cross_conv.weight"]
    )


def _inputs(b=2, s=3, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(b, 1, size, size, generator=g, dtype=torch.float64)
    si = torch.rand(b, s, 1, size, size, generator=g, dtype=torch.float64)
    sl = (torch.rand(b, s, 1, size, size, generator=g, dtype=torch.float64) > 0.5).double()
    return t, si, sl


def test_shared_support_equals_official_form(model64):
    t, si, sl = _inputs(b=3, s=4)
    with torch.no_grad():
        shared = model64.forward_shared(t, si[0], sl[0])
        official = torch.cat([model64(t[i : i + 1], si[:1], sl[:1]) for i in range(3)])
    assert shared.shape == (3, 1, 32, 32)
    assert (shared - official).abs().max().item() <= 1e-5


def test_permutation_and_duplication_invariance(model64):
    t, si, sl = _inputs(b=1, s=5)
    perm = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        a = model64(t, si, sl)
        b = model64(t, si[:, perm], sl[:, perm])
        c = model64(t, torch.cat([si, si], 1), torch.cat([sl, sl], 1))
    assert (a - b).abs().max().item() < 1e-9
    assert (a - c).abs().max().item() < 1e-9


def test_batch_items_are_independent(model64):
    t, si, sl = _inputs(b=2, s=2)
    with torch.no_grad():
        both = model64(t, si, sl)
        first = model64(t[:1], si[:1], sl[:1])
    assert (both[:1] - first).abs().max().item() < 1e-9


def test_labels_change_the_output(model64):
    t, si, sl = _inputs(b=1, s=2)
    with torch.no_grad():
        a = model64(t, si, sl)
        b = model64(t, si, 1 - sl)
    assert (a - b).abs().max().item() > 1e-6


def test_empty_support_is_a_clear_error(model64):
    t, si, sl = _inputs(b=1, s=1)
    with pytest.raises(EmptySupportError, match="empty"):
        model64(t, si[:, :0], sl[:, :0])
    with pytest.raises(EmptySupportError):
        model64.forward_shared(t, si[0, :0], sl[0, :0])


@pytest.mark.parametrize("bad", ["size", "shape", "batch"])
def test_bad_shapes_are_rejected(model64, bad):
    t, si, sl = _inputs(b=2, s=2)
    with pytest.raises(ValueError):
        if bad == "size":
            model64(t[..., :30, :30], si[..., :30, :30], sl[..., :30, :30])
        elif bad == "shape":
            model64(t, si, sl[:, :1])
        else:
            model64(t, si[:1], sl[:1])
