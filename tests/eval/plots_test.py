"""Plots are written without touching the process's matplotlib backend."""

import subprocess
import sys
import textwrap


def test_plotting_leaves_the_matplotlib_backend_alone(tmp_path):
    code = textwrap.dedent(f"""
        import matplotlib
        matplotlib.use("svg")  # a user's choice (a notebook's inline backend, say)
        import numpy as np
        from jaxlab.eval import plots
        records = [{{"step": s, "loss": 3.0 / s}} for s in range(1, 6)] + [
            {{"step": 5, "eval_loss": 0.7}}]
        plots.plot_loss_curve(records, {str(tmp_path / "loss.png")!r})
        plots.plot_loss_curves({{"a": records}}, {str(tmp_path / "curves.png")!r})
        plots.scatter_agreement(np.arange(4.0), np.arange(4.0), "x", "y", "t",
                                {str(tmp_path / "scatter.png")!r})
        print(matplotlib.get_backend())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "svg"
    for name in ("loss.png", "curves.png", "scatter.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
