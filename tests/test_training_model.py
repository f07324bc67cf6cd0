"""ResNet50 age head, loss pieces, weights loading and the preprocessing shared with export (CPU, small)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from agecam.training import model as M  # noqa: E402
from agecam.training.data import FaceDataset, Preprocessing, normalize, preprocessed_batches  # noqa: E402
from agecam.training.evaluate import compute_metrics  # noqa: E402
from agecam.training.synth import make_utkface_like  # noqa: E402

BINS = torch.tensor(M.BINS_YEARS)


def test_build_model_gives_100_logits_and_expected_age_in_range():
    # given a from-scratch model; when fed a small batch
    net = M.build_model(log=lambda *_: None).eval()
    with torch.no_grad():
        logits = net(torch.randn(2, 3, 64, 64))
    # then it returns 100 logits per image and the expectation lies within the bins
    assert logits.shape == (2, 100), f"logits shape {tuple(logits.shape)}"
    age = M.expected_age(logits, M.BINS_YEARS)
    assert ((age >= 1) & (age <= 100)).all(), f"expected ages {age}"


@pytest.mark.parametrize("true_years, expected_peak", [(1.0, 1.0), (35.0, 35.0), (100.0, 100.0), (116.0, 100.0)])
def test_soft_labels_peak_at_clipped_age(true_years, expected_peak):
    # given a true age; when turned into a soft label; then it sums to 1 and peaks at the clipped age
    q = M.soft_labels(torch.tensor([true_years]), BINS, 2.0)[0]
    assert abs(float(q.sum()) - 1) < 1e-5
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
