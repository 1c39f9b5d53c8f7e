from fmkit.quickstart import quickstart
from fmkit.train.metrics import read_metrics
from fmkit.workspace import Workspace


def test_quickstart_builds_every_artifact_and_loss_falls(tmp_path, capsys):
    model = quickstart(tmp_path, steps=30)
    printed = capsys.readouterr().out
    for path in ("tokenizers/stdlib", "shards/stdlib-train", "shards/stdlib-val", "models/quickstart"):
        assert (tmp_path / path / "fmkit.json").exists()
    assert (model / "loss_curve.png").stat().st_size > 10_000
    assert "bits/byte" in printed and "loss curve" in printed
    evals = [r["val_loss"] for r in read_metrics(model) if "val_loss" in r]
    assert evals[-1] < evals[0] - 1.0
    kinds = {a["kind"] for a in Workspace(tmp_path).artifacts()}
    assert kinds == {"tokenizer", "shards", "model"}
