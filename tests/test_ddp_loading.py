"""Two real ranks (torchrun, gloo on the CPU): load_shards and BucketBatchSampler give every rank the same
number of batches, so an all_reduce per batch never hangs, and together the ranks see every sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers_export import build_dataset

from prep.export.webdataset import export_webdataset

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import datetime, json, sys
    import torch, torch.distributed as dist
    from torch.utils.data import DataLoader
    import prep

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    shards, manifest, derived, out = sys.argv[1:5]
    result = {}

    def step_all(loader, keys_of):
        keys, steps = [], 0
        for batch in loader:
            assert len(set(map(str, batch["vae"].shape[2:]))) >= 1
            total = torch.ones(1)
            dist.all_reduce(total)  # a rank with fewer batches would leave the other waiting here
            assert total.item() == 2
            keys += keys_of(batch)
            steps += 1
        return keys, steps

    ds = prep.load_shards(shards, batch_size=2, shuffle=True, seed=4)  # rank/world from torch.distributed
    assert (ds.rank, ds.world_size) == (rank, 2)
    for epoch in range(2):
        ds.set_epoch(epoch)
        keys, steps = step_all(DataLoader(ds, batch_size=None, num_workers=2), lambda b: list(b["key"]))
        result[f"shards_{epoch}"] = {"keys": keys, "steps": steps}

    table = prep.load_manifest(manifest, derived, ready_only=True)
    sampler = prep.BucketBatchSampler(table, batch_size=4, seed=0)  # num_replicas/rank from torch.distributed
    loader = DataLoader(table, batch_sampler=sampler, collate_fn=prep.collate, num_workers=2)
    keys, steps = step_all(loader, lambda b: b["image_id"])
    result["sampler"] = {"keys": keys, "steps": steps}
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
''')


@pytest.mark.slow
def test_two_real_ranks_never_wait(tmp_path):
    data = build_dataset(tmp_path, per_bucket=5)
    shards = tmp_path / "shards"
    export_webdataset(data["manifest"], data["derived"], shards, shard_size=2, progress_every=0)
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES")}
    env["PYTHONPATH"] = str(REPO)
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", str(script),
           str(shards), str(data["manifest"]), str(data["derived"]), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name in ("shards_0", "shards_1", "sampler"):
        assert ranks[0][name]["steps"] == ranks[1][name]["steps"] > 0
        seen = ranks[0][name]["keys"] + ranks[1][name]["keys"]
        assert set(seen) == set(data["ready"])  # every sample, a few repeated for even epochs
        assert len(seen) < 2 * len(data["ready"]) and len(ranks[0][name]["keys"]) < len(data["ready"])  # split
    assert ranks[0]["shards_0"]["keys"] != ranks[0]["shards_1"]["keys"]  # set_epoch reshuffles
