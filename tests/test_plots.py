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


def test_points_place_sparse_evaluations_at_their_epochs():
    nan = float("nan")
    # recipes.read_epoch_log: NaN where an epoch was not evaluated.
    assert plots.points([nan, 12.0, nan, 10.0], 4) == ([2, 4], [12.0, 10.0])
    # History with validation_freq=2 keeps the evaluated epochs only.
    assert plots.points([12.0, 10.0], 4) == ([2, 4], [12.0, 10.0])
    assert plots.points([10.0], 24) == ([24], [10.0])
    assert plots.points([], 5) == ([], [])


def test_figure_shows_a_single_final_evaluation_and_zooms_on_the_end():
    """A run evaluated once, at the end, draws its test errors as marked
    points, and the right panel's y axis is fitted to the last epochs'
    test errors (differences of half a point stay readable)."""
    import matplotlib.pyplot as plt

    nan = float("nan")
    epochs = 24
    train = [0.3 + 0.6 * k / epochs for k in range(epochs)]  # accuracy 0.3 .. 0.875
    runs = {
        "baseline": {"accuracy": train, "val_accuracy": [nan] * 23 + [0.8024]},
        "dks": {"accuracy": train, "aux_a_accuracy": train, "aux_a_ce_loss": [1.0] * epochs,
                "val_accuracy": [nan] * 23 + [0.8075], "val_aux_a_accuracy": [nan] * 23 + [0.8099]},
    }
    fig = plots.error_figure(runs, heads=["main", "aux_a"])
    try:
        ax_all, ax_end = fig.axes
        for ax in (ax_all, ax_end):
            marked = [l for l in ax.get_lines() if l.get_marker() == "o" and len(l.get_xdata())]
            found = sorted((list(l.get_xdata()), [round(v, 2) for v in l.get_ydata()])
                           for l in marked)
            assert found == [([24], [19.01]), ([24], [19.25]), ([24], [19.76])], found
        low, high = ax_end.get_ylim()
        assert 19.76 < high < 19.76 + 0.5 and 19.01 - 0.5 < low < 19.01
        # One evaluation in the last epochs: the panel is that epoch's.
        assert ax_end.get_xlim() == (23, 25) and ax_end.get_title() == "test error at epoch 24"
        texts = sorted(t.get_text() for t in ax_end.texts)
        assert texts == ["baseline main 19.76%", "dks aux_a 19.01%", "dks main 19.25%"], texts
    finally:
        plt.close(fig)
