"""examples/ddp_crd.py (the README's DDP script) under torchrun, gloo, 2 CPU processes, unchanged
except for ``--memory-mode``: the sharded run ends with the replicated run's weights, banks
(gathered shards) and log Z."""

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--n-data",
    "101",
    "--nce-k",
    "16",
    "--feat-dim",
    "8",
    "--batch-size",
    "6",
    "--in-dim",
    "5",
    "--s-dim",
    "12",
    "--t-dim",
    "10",
    "--steps",
    "3",
]


@pytest.mark.distributed
def test_ddp_crd_example_replicated_and_sharded(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    states = {}
    for mode in ("replicated", "sharded"):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            os.path.join(REPO, "examples", "ddp_crd.py"),
            *SMALL,
            "--memory-mode",
            mode,
            "--save",
            str(tmp_path / mode),
        ]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"memory_mode={mode}" in proc.stdout and "MB on this rank" in proc.stdout
        states[mode] = [torch.load(f"{tmp_path / mode}.rank{r}.pt") for r in range(2)]
    rep, shard = states["replicated"], states["sharded"]
    assert rep[0]["criterion.memory.bank_s"].shape == (101, 8)
    assert [s["criterion.memory.bank_s"].shape[0] for s in shard] == [51, 50]
    for key in ("criterion.memory.bank_s", "criterion.memory.bank_t"):
        assert torch.equal(rep[0][key], rep[1][key])
        torch.testing.assert_close(torch.cat([shard[0][key], shard[1][key]]), rep[0][key], atol=1e-6, rtol=1e-6)
    for key, t in rep[0].items():
        if "memory." not in key:
            torch.testing.assert_close(shard[0][key], t, atol=1e-6, rtol=1e-6, msg=key)
            torch.testing.assert_close(shard[1][key], t, atol=1e-6, rtol=1e-6, msg=key)
    torch.testing.assert_close(
        shard[0]["criterion.memory.log_z"], rep[0]["criterion.memory.log_z"], atol=1e-6, rtol=1e-6
    )
    assert int(shard[1]["criterion.memory.rng_offset"]) == int(rep[0]["criterion.memory.rng_offset"]) == 3 * 12 * 16


def test_readme_shows_the_example_verbatim():
    readme = open(os.path.join(REPO, "README.md")).read()
    script = open(os.path.join(REPO, "examples", "ddp_crd.py")).read()
    assert "<!-- examples/ddp_crd.py -->\n```python\n" + script + "```" in readme


def test_readme_drop_in_example_runs():
    """The README's front-door snippet (## Drop-in) runs as printed and gives a finite loss."""
    import re

    readme = open(os.path.join(REPO, "README.md")).read()
    code = re.search(r"## Drop-in\n\n```python\n(.*?)```", readme, flags=re.S).group(1)
    scope = {}
    exec(compile(code, "README.md (Drop-in)", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and torch.isfinite(scope["l"])
    assert scope["criterion"].memory.bank_s.shape == (50_000, 128)
