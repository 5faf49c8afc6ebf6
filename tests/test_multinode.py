"""Multi-node, shown on one machine: two torchrun "nodes" (one process each) meet through a c10d rendezvous on
127.0.0.1 and must train exactly like the single-node 2-process run (same loss curve, same final weights).

The baseline is the 2-process run of ``test_loss_reduction.sequence_runs`` (batch 1 × 2 accumulation steps, per
sequence reduction), so this test adds only the two-node run.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_loss_reduction import COMMON, sequence_runs  # noqa: F401  (session fixture: shared with that module)
from test_recipe import CONFIGS, RECIPE, load_weights, losses, path_overrides, read_metrics, run_env, tiny_assets  # noqa: F401,E501


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_exactly_like_one_node_with_two_processes(sequence_runs, tiny_assets, tmp_path):  # noqa: F811
    _, _, two_dir, two = sequence_runs
    out = tmp_path / "run"
    port = free_port()
    overrides = [*path_overrides(tiny_assets, out), "loss.reduction=sequence", "batch_size=1",
                 "gradient_accumulation_steps=2", *COMMON]
    nodes = []
    for node_rank in (0, 1):  # what `tune run --nnodes 2 --nproc_per_node 1 --rdzv_endpoint ...` starts per node
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node_rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=iwsft_multinode_test", str(RECIPE), "--config", str(CONFIGS / "tiny_cpu.yaml"), *overrides]
        nodes.append(subprocess.Popen(cmd, cwd=str(tmp_path), env=run_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    for p, log in zip(nodes, logs):
        assert p.returncode == 0, log[-5000:]
    assert "2 process(es)" in "".join(logs)  # one world of two ranks, not two single-process runs
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [r["step"] for r in two] == [1, 2]
    assert losses(rows) == pytest.approx(losses(two), rel=1e-6)
    assert losses(rows, "weight_mean") == pytest.approx(losses(two, "weight_mean"), rel=1e-6)
    a, b = load_weights(two_dir / "epoch_0"), load_weights(out / "epoch_0")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)
