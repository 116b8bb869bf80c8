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
    devices = f"--xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {devices}".strip()  # keeps conftest's
    env["JAX_PLATFORMS"] = "cpu"
    return env


CHECKS = ("shard_map", "pmap", "jit_2d_mesh", "training", "ghost")
# what each check prints before ": ok", per clipper it checks
PREFIX = {
    "shard_map": "shard_map ",
    "pmap": "pmap ",
    "jit_2d_mesh": "jit 2-D mesh ",
    "training": "training ",
    "ghost": "ghost ",
}
# the fewest lines ending in ": ok" each check prints
LEAST_OK = {"ghost": 2}


def _run_checks(checks, clippers):
    proc = subprocess.run(
        [sys.executable, str(HERE / "checks.py"), *checks],
        env=_env(8) | {"JAXCLIP_CHECK_CLIPPERS": clippers},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for check in checks:
        ok = [line for line in proc.stdout.splitlines() if line.startswith(PREFIX[check])]
        assert sum(line.endswith(": ok") for line in ok) >= LEAST_OK.get(check, 4), (
            check,
            proc.stdout,
        )


def test_eight_devices():
    """Clippers of every kind (rule, per unit, per element, guard: checks.SOME) under
    shard_map, pmap, jit on a 2-D mesh and in sharded training, and ghost clipping of a
    batch split over the devices: every check in one
    process, which imports jax and compiles the single-device references once."""
    _run_checks(CHECKS, "some")


@pytest.mark.slow
@pytest.mark.parametrize("check", ["shard_map", "pmap", "jit_2d_mesh", "training"])
def test_eight_devices_every_clipper(check):
    """Every clipper and option (checks.clippers)."""
    _run_checks([check], "all")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
    """Two processes of two devices each, joined by gloo, end where one device does
    (process 0 also trains on one of its devices alone, without sharding, for the
    reference: a third process would import jax and compile again)."""
    script = str(HERE / "multihost.py")
    port = _free_port()
    reference = tmp_path / "reference.npz"
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
                *(["--reference-out", str(reference)] if i == 0 else []),
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

    want = np.load(reference)
    assert {"clip_by_global_norm/w1", "zclip/norms", "zclip/threshold"} <= set(want.files)
    for i in range(2):
        got = np.load(tmp_path / f"process{i}.npz")
        assert set(got.files) == set(want.files)
        for key in want.files:
            np.testing.assert_allclose(
                got[key], want[key], rtol=1e-6, atol=1e-6, err_msg=f"process {i}: {key}"
            )
