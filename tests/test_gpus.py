"""GPU placement, proven without a GPU: a `ray start` node with two *logical* GPUs
(`--num-gpus=2` on this CPU machine). Ray schedules `runtime.num_gpus` exactly as on real GPUs
and tells each actor its GPU ids; `runtime.device: cpu` lets the actors compute on the CPU, which
is what makes these runs possible here. With `device: auto` the same actors must refuse to run,
since this torch cannot use CUDA."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import agent_ports, cluster_env, free_port, kill_cluster, masked_corpus

from rayinfer.testing import write_dataset

pytestmark = pytest.mark.slow  # a `ray start` node with logical GPUs of its own

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def gpu_node():
    temp = tempfile.mkdtemp(prefix="ri-gpus-", dir="/tmp")
    port, dash = free_port(), free_port()
    env = cluster_env()
    try:
        head = subprocess.run(
            [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4", "--num-gpus=2", "--memory=4000000000",
             f"--temp-dir={temp}", "--node-ip-address=127.0.0.1", *agent_ports()],
            env=env, capture_output=True, text=True, timeout=180,
        )
        assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        kill_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


def run_on(node, tmp_path, model, **runtime):
    """`rayinfer run` joined to the node; returns (exit code, stderr, manifest or None)."""
    write_dataset(tmp_path / "in", masked_corpus(160), files=2, row_group_size=20)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "task": "fill-mask", "model": str(model),
        "input": {"path": str(tmp_path / "in"), "id_column": "doc_id", "columns": {"text": "sentence"}},
        "output": {"path": str(tmp_path / "out")}, "options": {"top_k": 2},
        "runtime": {"batch_size": 20, **runtime},
    }))
    done = subprocess.run([sys.executable, "-m", "rayinfer", "run", str(job), "--address", node["address"]],
                          env=node["env"], capture_output=True, text=True, timeout=600)
    manifest = tmp_path / "out" / "_manifest.json"
    return done.returncode, done.stderr, json.loads(manifest.read_text()) if manifest.exists() else None


def pool_actors(node, manifest):
    """This run's pool actors as Ray's state API lists them (matched to the manifest by node:pid)."""
    listed = subprocess.run(
        [str(BIN / "ray"), "list", "actors", "--address", node["dashboard"], "--detail", "--format", "json",
         "--limit", "1000"], env=node["env"], capture_output=True, text=True, timeout=120,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    return [a for a in json.loads(listed.stdout)
            if f"{(a.get('node_id') or '')[:12]}:{a.get('pid')}" in manifest["actor_gpu_ids"]]


def test_a_node_that_offers_less_memory_than_one_actor_needs_refuses_the_job_in_one_line(gpu_node, tmp_path,
                                                                                       rayinfer_bert):
    """The node offers Ray's tasks 4 GB (`ray start --memory`); one actor of this job would hold
    about 6.9 GB (a 2M-token pass budget): refused before any weights load, in one line naming the
    need, the node's memory and the fixes; nothing is written."""
    code, err, manifest = run_on(gpu_node, tmp_path, rayinfer_bert, device="cpu", num_gpus=0,
                                 max_batch_tokens=2_000_000)
    errors = [ln for ln in err.splitlines() if ln.startswith("rayinfer: error:")]
    assert code == 3 and len(errors) == 1 and manifest is None, err[-3000:]
    assert errors[0].startswith("rayinfer: error: no node can hold one actor: it needs about 6.9 GB of memory "
                                "(working memory 6.1 GB, the runtime 0.8 GB, weights 0 MB (55K parameters in float32)), "
                                "the largest node offers 4.0 GB. Fixes: a smaller runtime.max_batch_tokens"), errors[0]
    assert "a node with more memory (Ray offers its tasks what `ray start --memory` gives" in errors[0]
    assert not list((tmp_path / "out").glob("part-*"))


def test_half_a_gpu_each_places_four_actors_two_per_gpu(gpu_node, tmp_path, rayinfer_bert):
    code, err, manifest = run_on(gpu_node, tmp_path, rayinfer_bert, actors=4, num_gpus=0.5, num_cpus=0.5, device="cpu")
    assert code == 0, err[-3000:]
    assert sorted(r["doc_id"] for r in pq.read_table(tmp_path / "out").to_pylist()) == list(range(1000, 1160))
    gpus = manifest["actor_gpu_ids"]
    assert len(gpus) == 4 and all(len(ids) == 1 for ids in gpus.values()), gpus
    assert Counter(ids[0] for ids in gpus.values()) == {"0": 2, "1": 2}
    pool = pool_actors(gpu_node, manifest)
    assert len(pool) == 4 and all(a["required_resources"].get("GPU") == 0.5 for a in pool), pool
    assert list(manifest["actor_devices"].values()) == [{"device": "cpu", "dtype": "float32"}] * 4  # device: cpu


def test_a_whole_gpu_each_places_two_actors(gpu_node, tmp_path, rayinfer_bert):
    code, err, manifest = run_on(gpu_node, tmp_path, rayinfer_bert, actors=2, num_gpus=1, num_cpus=1, device="cpu")
    assert code == 0, err[-3000:]
    gpus = manifest["actor_gpu_ids"]
    assert sorted(ids[0] for ids in gpus.values()) == ["0", "1"] and all(len(i) == 1 for i in gpus.values()), gpus
    pool = pool_actors(gpu_node, manifest)
    assert len(pool) == 2 and all(a["required_resources"].get("GPU") == 1 for a in pool), pool


def test_more_gpus_per_actor_than_the_cluster_has_is_refused_before_any_actor(gpu_node, tmp_path, rayinfer_bert):
    code, err, manifest = run_on(gpu_node, tmp_path, rayinfer_bert, num_gpus=3, num_cpus=1, device="cpu")
    assert code == 3, err[-3000:]
    assert ("rayinfer: error: runtime.num_gpus is 3 but the Ray cluster has 2 GPUs. An actor holds one model on one "
            "node: set runtime.num_gpus to at most 2") in err
    assert manifest is None and not list((tmp_path / "out").glob("*.parquet"))


def test_device_cpu_with_num_gpus_unset_takes_no_gpu_on_a_gpu_node(gpu_node, tmp_path, rayinfer_bert):
    """runtime.device: cpu on a Ray with GPUs: num_gpus unset is 0 (the run says so), the actors
    hold no GPU, and the manifest names each one's device and dtype."""
    code, err, manifest = run_on(gpu_node, tmp_path, rayinfer_bert, actors=2, num_cpus=1, device="cpu")
    assert code == 0, err[-3000:]
    assert "rayinfer: note: runtime.device is cpu: the actors take no GPU (the cluster has 2)" in err
    assert sorted(r["doc_id"] for r in pq.read_table(tmp_path / "out").to_pylist()) == list(range(1000, 1160))
    assert list(manifest["actor_gpu_ids"].values()) == [[], []]
    assert list(manifest["actor_devices"].values()) == [{"device": "cpu", "dtype": "float32"}] * 2
    pool = pool_actors(gpu_node, manifest)
    assert len(pool) == 2 and not any(a["required_resources"].get("GPU") for a in pool), pool


def test_an_actor_given_a_gpu_that_torch_cannot_use_fails_at_once_saying_why(gpu_node, tmp_path, rayinfer_bert):
    """num_gpus unset on a Ray with GPUs: one per actor (the run's first line says so); with
    device: auto an actor holding a GPU computes on it, and this torch cannot."""
    import torch

    code, err, _ = run_on(gpu_node, tmp_path, rayinfer_bert, num_cpus=1, device="auto")
    assert code != 0
    assert "rayinfer: note: runtime.num_gpus unset: 1 GPU per actor (the cluster has 2)" in err, err[-3000:]
    line = [ln for ln in err.splitlines() if ln.startswith("rayinfer: error:")]
    assert line, err[-3000:]
    assert "GPU(s) 0" in line[0] or "GPU(s) 1" in line[0]
    assert f"torch cannot use CUDA there: torch {torch.__version__} is a CPU-only build" in line[0]
    assert "set runtime.device: cpu to compute on the CPU on purpose" in line[0]
    assert "Traceback" not in err
