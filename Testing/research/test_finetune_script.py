"""The GPU path of issue 20 (UniverSegResearch/gpu/finetune_then_fusion.sh): its fine-tuning
stage runs on the CPU for a few steps from the shipped starter weights and leaves a weights file
the product loads. (The fusion stage's own steps -- samples, seeded training -- are tested in
test_fusion_net.py on tiny data.)"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PREPARED = Path(os.environ.get("UNIVERSEG_PREPARED", "/work/data/prepared"))


@pytest.mark.skipif(not (PREPARED / "train").is_dir(), reason="prepared training data missing")
def test_the_finetune_stage_runs_a_few_steps_on_the_cpu(tmp_path):
    from UniverSegLogic.core.weights import check_archive, load_weights

    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "val").mkdir()
    shutil.copy(PREPARED / "train" / "ts_ct_dicom__axial.npz", data / "train")
    shutil.copy(PREPARED / "val" / "ts_mr_abdomen__axial.npz", data / "val")
    out = tmp_path / "out"
    env = dict(
        os.environ,
        STAGE="finetune",
        DATA=str(data),
        OUT=str(out),
        MINUTES="3",
        MAX_STEPS="2",
        PYTHON=sys.executable,
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
    )
    args = ["--device", "cpu", "--episodes", "2", "--targets", "1", "--val-structures", "1"]
    p = subprocess.run(
        ["bash", "UniverSegResearch/gpu/finetune_then_fusion.sh", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    weights = out / "finetuned.pt"
    assert "fine-tuned weights" in p.stdout and weights.is_file()
    check_archive(str(weights))
    tuned = torch.load(weights, map_location="cpu", weights_only=True)
    starter = torch.load(ROOT / "Resources" / "starter_weights.pt", weights_only=True)
    assert tuned.keys() == starter.keys()
    # it trained from the starter weights (the copied file is the best on validation, which
    # after two steps may be the start itself; the last weights moved)
    last = torch.load(out / "train" / "last.pt", map_location="cpu", weights_only=True)
    assert last.keys() == starter.keys()
    assert any(not torch.equal(last[k].float(), starter[k].float()) for k in starter)
    load_weights(str(weights))  # the product takes it as a weights file
