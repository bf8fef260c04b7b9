"""keras_dks.plots: per-head error curves from DKS logs, and their figure."""

import numpy as np

from keras_dks import plots


def test_error_curves_and_plot(tmp_path):
    history = {
        "loss": [3.0, 2.0],
        "accuracy": [0.5, 0.75],
        "aux_group1_ce_loss": [1.0, 0.9],
        "aux_group1_accuracy": [0.25, 0.5],
        "top5": [0.9, 0.95],
        "val_accuracy": [0.6, 0.8],
        "val_aux_group1_accuracy": [0.3, 0.6],
    }
    curves = plots.error_curves(history)
    assert list(curves) == ["main", "aux_group1"]
    np.testing.assert_allclose(curves["main"]["train"], [50.0, 25.0])
    np.testing.assert_allclose(curves["aux_group1"]["test"], [70.0, 40.0])
    path = plots.plot_error_curves({"baseline": {"accuracy": [0.5]}, "dks": history},
                                   str(tmp_path / "sub" / "c.png"), title="t")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"



def test_head_names_follow_the_per_head_losses():
    history = {"loss": [1.0], "ce_loss": [0.5], "aux_b_ce_loss": [0.6],
               "aux_a_ce_loss": [0.7], "val_aux_c_ce_loss": [0.1], "accuracy": [0.5]}
    assert plots.head_names_of(history) == ["main", "aux_b", "aux_a"]
    # Heads without accuracy logs are left out; asked-for order is kept.
    curves = plots.error_curves({"accuracy": [0.9], "val_aux_a_accuracy": [0.8]},
                                head_names=["aux_a", "aux_b", "main"])
    assert list(curves) == ["aux_a", "main"]
    assert curves["aux_a"]["train"] == [] and np.allclose(curves["aux_a"]["test"], [20.0])
