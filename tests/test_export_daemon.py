"""The daemon runs an exported ResNet50 on the demo source, and the ages it publishes come from that model."""
import pytest

from tests.helpers import running_app

pytestmark = pytest.mark.slow
PLANTED_AGE_YEARS = 87.0


@pytest.fixture(scope="module")
def planted_model(trained_checkpoint, tmp_path_factory):
    """A trained checkpoint whose head is set to answer ~87 years for any face, exported through `agecam export`."""
    import torch

    from agecam.export.pipeline import export_checkpoint

    ckpt_path, data = trained_checkpoint
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    bins = torch.tensor(ckpt["bins_years"], dtype=torch.float32)
    sd = ckpt["model"]
    sd["fc.weight"] = torch.zeros_like(sd["fc.weight"])
    sd["fc.bias"] = -((bins - PLANTED_AGE_YEARS) ** 2) / (2 * 2.0 ** 2)  # a narrow Gaussian around the planted age
    out_dir = tmp_path_factory.mktemp("planted")
    planted_ckpt = out_dir / "planted.pt"
    torch.save(ckpt, planted_ckpt)
    onnx_path = out_dir / "planted.onnx"
    export_checkpoint(planted_ckpt, onnx_path, "fp32", eval_data=data, log=lambda line: None)
    return onnx_path


def test_daemon_publishes_ages_from_the_exported_model(planted_model, models_dir):
    # given the daemon configured with the exported model: exactly one config line differs from the default
    doc = {"cameras": [{"name": "demo", "source": "demo", "demo_duration_s": 8.0}], "age": {"model": str(planted_model)}}
    with running_app(doc, models_dir) as run:
        assert run.wait_ended(60), "the 8 s demo camera did not end within 60 s"
        age_model = run.app._age_model
        assert age_model.path == planted_model and len(age_model.bins_years) == 100, \
            "the daemon did not load the exported model (the reference has 81 bins)"
    # then every published age is the planted one: the ages come from the exported model, not the reference
    ages = [e["age"]["years"] for e in run.sub.events if e.get("age")]
    assert ages, "no event carried an age"
    assert all(abs(a - PLANTED_AGE_YEARS) < 1.5 for a in ages), f"ages not from the exported model: {sorted(set(ages))[:10]}"
