import math

import pytest
import torch

from FocusNetCore.losses import (
    autoencoder_loss, binary_segmentation_loss, dice_loss, focal_loss, generator_loss, heatmap_loss,
    organ_weights, reconstruction_loss, segmentation_loss, shape_loss,
)


def one_voxel(logits_per_class, label):
    logits = torch.tensor(logits_per_class, dtype=torch.float64).view(1, -1, 1, 1, 1)
    return logits, torch.tensor([label]).view(1, 1, 1, 1)


def test_focal_loss_hand_computed():
    logits, target = one_voxel([0.0, math.log(3.0)], 1)  # p = (0.25, 0.75)
    expected = -(0.25 ** 2) * math.log(0.75)
    assert float(focal_loss(logits, target, gamma=2.0)) == pytest.approx(expected)
    alpha = torch.tensor([1.0, 4.0])
    assert float(focal_loss(logits, target, alpha=alpha)) == pytest.approx(4.0 * expected)
    # gamma 0 is cross-entropy
    assert float(focal_loss(logits, target, gamma=0.0)) == pytest.approx(-math.log(0.75))


def test_dice_loss_hand_computed():
    # Two voxels, classes {0, 1}; probabilities 0.75/0.25 and 0.25/0.75; labels 0 and 1.
    logits = torch.tensor([[0.0, -math.log(3.0)], [0.0, math.log(3.0)]], dtype=torch.float64)
    logits = logits.T.reshape(1, 2, 1, 1, 2)
    target = torch.tensor([0, 1]).view(1, 1, 1, 2)
    # Per class: 1 - 2 * 0.75 / (1 + 1) = 0.25; summed over two classes.
    assert float(dice_loss(logits, target)) == pytest.approx(0.5, abs=1e-4)


def test_dice_leaves_out_classes_the_sample_does_not_show():
    # Two voxels labelled 0 and 1; class 2 is in neither, yet has p = 0.25 at both.
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]], dtype=torch.float64)
    logits = probs.log().T.reshape(1, 3, 1, 1, 2)
    target = torch.tensor([0, 1]).view(1, 1, 1, 2)
    # Classes 0 and 1: 1 - 2 * 0.5 / (1 + 0.75) each; class 2 adds nothing.
    assert float(dice_loss(logits, target)) == pytest.approx(2 * (1 - 1 / 1.75), abs=1e-4)
    # Predicting class 2 nowhere earns nothing either (with the smoothing
    # term counted, it scored a perfect 0 there, and S-Net learnt to never
    # predict organs few crops show).
    nowhere = logits.clone()
    nowhere[:, 2] = -60.0
    assert float(dice_loss(nowhere, target)) > float(dice_loss(logits, target)) - 0.5


def test_missing_organ_is_not_learned_as_background():
    # A voxel labelled background where the net says "organ 2" with certainty.
    logits, target = one_voxel([0.0, 0.0, 20.0], 0)
    present_all = torch.tensor([[True, True, True]])
    missing_2 = torch.tensor([[True, True, False]])
    assert float(segmentation_loss(logits, target, present=present_all)) > 1.0
    # Organ 2 is not contoured in this case: predicting it there costs (almost) nothing.
    assert float(focal_loss(logits, target, present=missing_2)) < 1e-6
    full = dice_loss(logits, target, present=present_all)
    partial = dice_loss(logits, target, present=missing_2)
    assert float(partial) < float(full)


def test_binary_and_heatmap_losses():
    prob = torch.full((1, 1, 2, 2, 2), 0.5)
    target = torch.ones_like(prob)
    expected_focal = -(0.5 ** 2) * math.log(0.5)
    expected_dice = 1 - (2 * 4 + 1e-5) / (4 + 8 + 1e-5)
    assert float(binary_segmentation_loss(prob, target)) == pytest.approx(expected_focal + expected_dice, abs=1e-5)
    assert float(heatmap_loss(prob, target)) == pytest.approx(0.25)


def test_adversarial_terms():
    y, g = torch.ones(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2)
    assert float(reconstruction_loss(y * 0.5, y, g + 0.5, g)) == pytest.approx(0.5)
    codes_t, codes_p = [torch.zeros(1, 4), torch.zeros(1, 2, 2)], [torch.ones(1, 4), torch.full((1, 2, 2), 2.0)]
    assert float(shape_loss(codes_t, codes_p)) == pytest.approx(1.0 + 4.0)
    assert float(generator_loss(torch.tensor(1.0), torch.tensor(2.0))) == pytest.approx(11.0)
    assert float(autoencoder_loss(torch.tensor(1.0), torch.tensor(2.0))) == pytest.approx(1.0 - 0.002)


def test_organ_weights_inverse_to_size():
    alpha = organ_weights([1000.0, 100.0, 10.0])
    assert float(alpha[2] / alpha[1]) == pytest.approx(10.0)
    assert float(alpha.mean()) == pytest.approx(1.0)
    soft = organ_weights([1000.0, 100.0, 10.0], power=0.5)
    assert float(soft[2] / soft[1]) == pytest.approx(math.sqrt(10.0))
    # The background (first) weighs as the largest organ, not by its own size:
    # a false positive in it must cost as much as one in the largest organ.
    alpha = organ_weights([1e6, 100.0, 10.0])
    assert float(alpha[0]) == pytest.approx(float(alpha[1])) and float(alpha[2] / alpha[0]) == pytest.approx(10.0)


def test_foreground_weighted_heatmap_loss_sees_a_missed_peak():
    """A SOL-Net answering 0 everywhere is near plain L2's minimum on a small
    organ's Gaussian; weighing voxels by 1 + w * target makes the missed peak
    cost what a wrong background costs. Hand-computed on 4 voxels."""
    target = torch.tensor([1.0, 0.5, 0.0, 0.0]).view(1, 1, 1, 1, 4)
    zeros = torch.zeros_like(target)
    assert float(heatmap_loss(zeros, target)) == pytest.approx((1 + 0.25) / 4)
    # (1 * (1 + 10) + 0.25 * (1 + 5)) / 4
    assert float(heatmap_loss(zeros, target, foreground_weight=10)) == pytest.approx((11 + 1.5) / 4)
    assert float(heatmap_loss(target, target, foreground_weight=10)) == 0.0


def test_solnet_loss_follows_the_training_setting():
    """SOL-Net's stage scores its heat maps with the configured loss: the
    paper's L2 on the sigmoid by default, the cross-entropy on the logits
    with ``heatmap_loss: cross_entropy``; the setting survives a checkpoint's
    configuration round trip."""
    from FocusNetCore.data import heatmaps
    from FocusNetCore.losses import heatmap_cross_entropy
    from FocusNetCore.networks import FocusNetConfig, SOLNet
    from FocusNetCore.train import TrainConfig, solnet_loss

    torch.manual_seed(0)
    config = FocusNetConfig(width=0.125)
    solnet = SOLNet(config).eval()
    labels = torch.zeros(8, 16, 16, dtype=torch.long)
    labels[3:6, 7:10, 7:10] = config.organs.small_labels[0]
    target = torch.as_tensor(heatmaps(labels.numpy(), config.organs.small_labels)[0])[None]
    features = torch.randn(1, config.channels(32), 8, 16, 16)
    with torch.no_grad():
        logits = solnet.logits(features)
        l2 = solnet_loss(solnet, features, target, TrainConfig())
        ce = solnet_loss(solnet, features, target, TrainConfig(heatmap_loss="cross_entropy"))
    assert torch.allclose(torch.sigmoid(logits), solnet(features))
    assert float(l2) == pytest.approx(float(heatmap_loss(torch.sigmoid(logits), target)))
    assert float(ce) == pytest.approx(float(heatmap_cross_entropy(logits, target)))
    assert float(ce) != pytest.approx(float(l2))
    stored = TrainConfig(heatmap_loss="cross_entropy").to_dict()
    assert TrainConfig.from_dict(stored).heatmap_loss == "cross_entropy"


def test_cross_entropy_heatmap_loss_is_least_at_the_target():
    from FocusNetCore.losses import heatmap_cross_entropy

    target = torch.tensor([0.9, 0.5, 0.1, 0.0]).view(1, 1, 1, 1, 4)
    logits = torch.logit(target.clamp(1e-6, 1 - 1e-6)).requires_grad_()
    heatmap_cross_entropy(logits, target).backward()
    assert float(logits.grad.abs().max()) < 1e-6
    # at the collapsed state the gradient on the organ's logits is -y / N
    collapsed = torch.full_like(target, -30.0).requires_grad_()
    heatmap_cross_entropy(collapsed, target).backward()
    assert torch.allclose(collapsed.grad, -target / 4, atol=1e-6)


def test_heatmap_loss_setting_is_checked():
    from FocusNetCore.train import TrainConfig

    with pytest.raises(ValueError, match="heatmap_loss"):
        TrainConfig(heatmap_loss="focal")
    with pytest.raises(ValueError, match="foreground_weight"):
        TrainConfig(heatmap_loss="cross_entropy", heatmap_foreground_weight=10.0)
