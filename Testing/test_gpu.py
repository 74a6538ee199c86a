"""What only a GPU can check (skipped without CUDA; benchmarks/gpu_check.sh
runs them on a lent GPU): the embedded model on CUDA agrees with the CPU,
and a few training iterations in the precision chosen for the card give
finite weights and say why that precision."""
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_segmentation_agrees_with_the_cpu():
    from FocusNetCore.metrics import dice
    from FocusNetCore.phantom import generate_case
    from FocusNetCore.segment import Segmenter

    case = generate_case(1000, "small")
    cpu = sitk.GetArrayFromImage(Segmenter(device="cpu").segment(case.image).labels)
    gpu = sitk.GetArrayFromImage(Segmenter(device="cuda").segment(case.image).labels)
    scores = [dice(gpu == label, cpu == label) for label in np.unique(cpu) if label]
    assert len(scores) >= 15 and float(np.mean(scores)) > 0.97, scores


def test_cuda_training_in_the_cards_precision_stays_finite(tmp_path):
    from FocusNetCore import precision
    from FocusNetCore.phantom import generate_case, write_case
    from FocusNetCore.train import Trainer, TrainConfig, load_config

    for seed in (300, 301, 302):
        write_case(generate_case(seed, "small"), tmp_path / "data", "nrrd")
    config = TrainConfig.from_dict({**load_config(ROOT / "configs" / "tiny-test.yaml").to_dict(),
                                    "stages": {"snet": 20, "solnet": 10, "aae_pretrain": 5, "sos": 10, "finetune": 5}})
    trainer = Trainer(config, tmp_path / "data", tmp_path / "run", "cuda", log=print, workers=2)
    chosen, why = precision.choose_for_training("auto", "cuda")
    assert trainer.precision == chosen and torch.cuda.get_device_name() in why
    trainer.run(progress=False)
    assert all(torch.isfinite(p).all() for p in trainer.model.state_dict().values() if p.is_floating_point())
