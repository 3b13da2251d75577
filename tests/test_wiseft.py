"""`navit-clip wise-ft START FINETUNED OUT --alpha A`: weight-space ensembling of a fine-tuned model with
the checkpoint it started from, written as a checkpoint that loads like any other."""

import pytest
import torch

from navit_clip.cli import main as cli
from navit_clip.config import Config, to_dict
from navit_clip.factory import create_model
from navit_clip.model.clip import NaViTCLIP


def _checkpoint(path, seed: int, width: int = 32, **run):
    cfg = Config()
    v = cfg.model.vision
    v.patch_size, v.width, v.depth, v.heads = 8, width, 1, 4
    cfg.data.patch_size = 8
    cfg.model.text.width, cfg.model.text.depth, cfg.model.text.heads = 32, 1, 4
    for key, value in run.items():  # how a run trained (locking): not the architecture
        setattr(v, key, value)
    torch.manual_seed(seed)
    torch.save({"model": NaViTCLIP(cfg.model).state_dict(), "config": to_dict(cfg), "step": 7 * seed}, path)
    return torch.load(path, weights_only=True)


def test_wise_ft_interpolates_every_weight_and_loads_like_any_checkpoint(tmp_path):
    start = _checkpoint(tmp_path / "start.pt", 0)
    tuned = _checkpoint(tmp_path / "tuned.pt", 1, lock=True, lock_unlocked_groups=2)
    for alpha in (0.0, 0.25, 1.0):
        out = tmp_path / f"wise_{alpha}.pt"
        assert (
            cli(
                [
                    "wise-ft",
                    str(tmp_path / "start.pt"),
                    str(tmp_path / "tuned.pt"),
                    str(out),
                    "--alpha",
                    str(alpha),
                ]
            )
            == 0
        )
        mixed = torch.load(out, weights_only=True)
        for k, t in mixed["model"].items():
            a, b = start["model"][k].double(), tuned["model"][k].double()
            torch.testing.assert_close(t.double(), a + alpha * (b - a), rtol=1e-6, atol=1e-7)  # float32 lerp
        assert mixed["config"] == tuned["config"] and mixed["step"] == 7
        assert mixed["source"]["wise_ft"]["alpha"] == alpha
        model = create_model(out)
        assert torch.equal(model.logit_scale.detach(), mixed["model"]["logit_scale"])
    assert torch.equal(
        torch.load(tmp_path / "wise_0.0.pt", weights_only=True)["model"]["visual.norm.weight"],
        start["model"]["visual.norm.weight"],
    )


def test_wise_ft_refuses_what_is_not_one_model_in_one_line(tmp_path, capsys):
    _checkpoint(tmp_path / "a.pt", 0)
    _checkpoint(tmp_path / "wide.pt", 1, width=64)
    torch.save({"model": {}}, tmp_path / "bare.pt")
    cases = {
        ("a.pt", "wide.pt", "0.5"): "model.vision.width",
        ("a.pt", "a.pt", "1.5"): "--alpha 1.5",
        ("a.pt", "missing.pt", "0.5"): "does not exist",
        ("a.pt", "bare.pt", "0.5"): "not a navit-clip checkpoint",
    }
    for (a, b, alpha), words in cases.items():
        args = ["wise-ft", str(tmp_path / a), str(tmp_path / b), str(tmp_path / "out.pt"), "--alpha", alpha]
        assert cli(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("alpha", [0.5])
def test_wise_ft_of_a_model_with_itself_is_itself(tmp_path, alpha):
    a = _checkpoint(tmp_path / "a.pt", 3)
    assert (
        cli(
            [
                "wise-ft",
                str(tmp_path / "a.pt"),
                str(tmp_path / "a.pt"),
                str(tmp_path / "o.pt"),
                "--alpha",
                str(alpha),
            ]
        )
        == 0
    )
    o = torch.load(tmp_path / "o.pt", weights_only=True)["model"]
    assert all(torch.equal(o[k], a["model"][k]) for k in o)
