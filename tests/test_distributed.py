"""Clipping across devices and hosts: 8 CPU devices, and two processes joined by gloo.

Each check runs in a fresh Python process, because the device count must be set
(XLA_FLAGS) before jax is imported.
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent / "multidevice"


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.mark.parametrize(
    "check,clippers",
    [
        pytest.param(check, clippers, marks=[pytest.mark.slow] if clippers == "all" else [])
        for check in ("shard_map", "pmap", "jit_2d_mesh")
        for clippers in ("some", "all")
    ]
    + [("training", "some")],
)
def test_eight_devices(check, clippers):
    """``some``: clippers of every kind (rule, per unit, per element, guard); ``all``: every
    clipper and option (checks.clippers)."""
    proc = subprocess.run(
        [sys.executable, str(HERE / "checks.py"), check],
        env=_env(8) | {"JAXCLIP_CHECK_CLIPPERS": clippers},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(": ok") >= 4, proc.stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
    script = str(HERE / "multihost.py")
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                script,
                "--process-id",
                str(i),
                "--port",
                str(port),
                "--out",
                str(tmp_path / f"process{i}.npz"),
            ],
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=300)
            logs.append(out)
    finally:
        for proc in procs:  # never leave a process waiting for its peer
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)

    reference = tmp_path / "reference.npz"
    subprocess.run(
        [sys.executable, script, "--num-processes", "0", "--out", str(reference)],
        env=_env(1),
        check=True,
        capture_output=True,
        timeout=300,
    )
    want = np.load(reference)
    assert {"clip_by_global_norm/w1", "zclip/norms", "zclip/threshold"} <= set(want.files)
    for i in range(2):
        got = np.load(tmp_path / f"process{i}.npz")
        for key in want.files:
            np.testing.assert_allclose(
                got[key], want[key], rtol=1e-6, atol=1e-6, err_msg=f"process {i}: {key}"
            )
