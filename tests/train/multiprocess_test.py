"""Two processes on localhost (jax.distributed over gloo, 4 CPU devices each) train the smoke
config and match one process with 8 devices."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

from configs import lm_smoke
from jaxlab.train import loop

REPO = pathlib.Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    config = lm_smoke.get_config()
    config.mesh.update(data=4, fsdp=1, tensor=2)
    single = loop.train_and_evaluate(config, str(tmp_path / "single"))
    assert single.experiment.mesh.size == 8

    port = _free_port()
    env = dict(
        os.environ,
        JAX_NUM_CPU_DEVICES="4",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        JAX_PLATFORMS="cpu",
    )
    workdir = tmp_path / "multi"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.train_lm",
                "--config=configs/lm_smoke.py",
                f"--workdir={workdir}",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                "--config.mesh.data=4",
                "--config.mesh.tensor=2",
                "--verbosity=0",  # INFO, for the data rows line
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "process 1 of 2: 4 local devices of 8" in outputs[1]
    # Each process built and tokenized only its own half of every global batch.
    batch = config.batch_size
    assert f"data: process 0 of 2 builds rows [0, {batch // 2}) of {batch}" in outputs[0]
    assert f"data: process 1 of 2 builds rows [{batch // 2}, {batch}) of {batch}" in outputs[1]

    def losses(path):
        return [r["loss"] for r in loop.read_metrics(str(path)) if "loss" in r]

    assert len(losses(workdir)) == config.num_steps
    np.testing.assert_allclose(losses(workdir), losses(tmp_path / "single"), rtol=2e-5)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]

    # The checkpoint holds every process's data state merged: each lane where the process that
    # built it left it, which is where the one-process run's lanes are (nothing pending to
    # re-read on resume).
    def data_state(path, step):
        return json.loads((path / "checkpoints" / str(step) / "data" / "metadata").read_text())

    for step in (4, 8):
        merged, alone = data_state(workdir, step), data_state(tmp_path / "single", step)
        assert all(p == 0 for stream in merged["streams"] for p in stream["pending"])
        assert merged == alone
