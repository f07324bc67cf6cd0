"""ResNet50 age head, loss pieces, weights loading and the preprocessing shared with export (CPU, small)."""
from __future__ import annotations

import numpy as np
import pytest

import torch

from agecam.training import model as M
from agecam.training.data import FaceDataset, Preprocessing, normalize, preprocessed_batches
from agecam.training.evaluate import compute_metrics
from agecam.training.synth import make_utkface_like

BINS = torch.tensor(M.BINS_YEARS)


def test_build_model_gives_100_logits_that_depend_on_the_image():
    # given a from-scratch model; when fed two different images
    net = M.build_model(log=lambda *_: None).eval()
    with torch.no_grad():
        logits = net(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    # then it returns 100 logits per image, and they differ between the images
    assert logits.shape == (2, 100), f"logits shape {tuple(logits.shape)}"
    assert not torch.allclose(logits[0], logits[1]), "the logits do not depend on the input"


@pytest.mark.parametrize("logits, expected_years", [
    (np.zeros(100), 50.5),  # uniform over 1..100
    (100.0 * np.eye(100)[34], 35.0),  # all mass on bin 35
    (np.log(np.eye(100)[[9, 29]].sum(0) + 1e-30), 20.0),  # half on 10, half on 30
])
def test_expected_age_is_the_expectation_over_the_bins(logits, expected_years):
    # given planted logits, when read as an age, then the age is the expectation of the bins under their softmax
    age = M.expected_age(torch.tensor(logits, dtype=torch.float32)[None], M.BINS_YEARS)
    assert float(age[0]) == pytest.approx(expected_years, abs=1e-3), f"age {float(age[0])}, expected {expected_years}"


@pytest.mark.parametrize("true_years, expected_peak", [(1.0, 1.0), (35.0, 35.0), (100.0, 100.0), (116.0, 100.0)])
def test_soft_labels_peak_at_clipped_age(true_years, expected_peak):
    # given a true age; when turned into a soft label; then it sums to 1 and peaks at the clipped age
    q = M.soft_labels(torch.tensor([true_years]), BINS, 2.0)[0]
    peak = min(max(true_years, 1.0), 100.0)
    want = np.exp(-((np.arange(1, 101) - peak) ** 2) / (2 * 2.0 ** 2))
    np.testing.assert_allclose(q.numpy(), want / want.sum(), atol=1e-6, err_msg="not a Gaussian of sigma 2 at the age")
    assert float(BINS[q.argmax()]) == expected_peak, f"peak at {float(BINS[q.argmax()])}"


def test_loss_is_lower_for_logits_matching_the_label():
    # given logits equal to the log soft label of 30 years and logits for 60 years
    good = torch.log(M.soft_labels(torch.tensor([30.0]), BINS, 2.0) + 1e-9)
    bad = torch.log(M.soft_labels(torch.tensor([60.0]), BINS, 2.0) + 1e-9)
    # when scored against 30 years; then the matching logits cost less and predict ~30
    lg, pg = M.age_loss(good, torch.tensor([30.0]), BINS)
    lb, _ = M.age_loss(bad, torch.tensor([30.0]), BINS)
    assert float(lg) < float(lb), f"loss {float(lg)} for matching vs {float(lb)} for wrong logits"
    assert abs(float(pg[0]) - 30) < 0.1, f"expected age {float(pg[0])}"


def test_prediction_interval_and_coverage_metric():
    # given sharp distributions at 20 and 70 years
    probs = M.soft_labels(torch.tensor([20.0, 70.0]), BINS, 2.0).numpy().astype(np.float64)
    lo, hi = M.prediction_interval(torch.from_numpy(probs), BINS, 0.9)
    # then the 90 % interval is about +-1.645 sigma around each centre
    assert lo.tolist() == [17.0, 67.0] and hi.tolist() == [23.0, 73.0], f"intervals {lo.tolist()} {hi.tolist()}"
    # when scored against truths inside and outside those intervals
    m, _ = compute_metrics(probs, np.array([21.0, 90.0]), np.asarray(M.BINS_YEARS), [0, 1], [0, 2], 45.0)
    # then coverage, MAE and accuracies follow
    assert m["coverage90"] == 0.5 and abs(m["mae_years"] - 10.5) < 0.05 and m["cs5"] == 0.5, m
    assert m["exact_acc"] == 0.0 and m["pm1_acc"] == 0.5 and m["baseline_mae_years"] == 34.5, m
    assert set(m["mae_by_gender"]) == {"male", "female"} and set(m["mae_by_ethnicity"]) == {"White", "Asian"}, m


def test_weights_file_loads_and_wrong_file_is_refused(tmp_path):
    # given a saved state dict with a "module." prefix and an ImageNet-width head
    from torchvision.models import resnet50

    src = resnet50(weights=None)
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "r50.pt")
    messages = []
    # when loaded as --weights FILE; then the backbone matches and the mismatched head is reported as skipped
    net = M.build_model(weights=tmp_path / "r50.pt", log=messages.append)
    assert torch.equal(net.conv1.weight, src.conv1.weight), "backbone weights were not loaded"
    assert "skipped" in messages[-1] and "fc.weight" in messages[-1], messages
    assert net.head_from_weights is False, "a 1000-way head must not count as a loaded age head"
    # and a file that is not a ResNet50 is refused with a clear message
    torch.save({"a": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(M.WeightsError, match="ResNet50"):
        M.build_model(weights=tmp_path / "bad.pt", log=messages.append)
    with pytest.raises(M.WeightsError, match="not found"):
        M.build_model(weights=tmp_path / "missing.pt", log=messages.append)


def test_preprocessed_batches_match_evaluation_inputs(tmp_path):
    # given generated chips and a checkpoint's preprocessing
    info = make_utkface_like(tmp_path, 5, seed=1, anomalies=False)
    paths = [tmp_path / n for n in info["clean"]]
    ckpt = {"img_size": 48, "mean": M.MEAN_PX, "std": M.STD_PX, "color_order": "RGB"}
    # when batched for export and read through the evaluation dataset
    batches = list(preprocessed_batches(ckpt, paths, batch_size=2))
    prep = Preprocessing.from_checkpoint(ckpt)
    ds = FaceDataset(paths, [0.0] * 5, prep, train=False)
    ref = normalize(torch.stack([ds[i][0] for i in range(5)]), prep)
    # then shapes and values are identical
    assert [tuple(b.shape) for b in batches] == [(2, 3, 48, 48), (2, 3, 48, 48), (1, 3, 48, 48)]
    assert torch.equal(torch.cat(batches), ref), "export preprocessing differs from evaluation preprocessing"
    assert abs(float(ref.mean())) < 3, f"normalised inputs look unnormalised (mean {float(ref.mean())})"
