"""An actor's memory, known before Ray starts (#40): parameters read from the checkpoint's files
alone (sharded safetensors headers, sharded .bin sizes), `validate` saying the need, Ray asked
for it, and a job no node can hold refused in one line before any weights load."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from helpers import fill_mask_job
from transformers import AutoModelForCausalLM

from rayinfer.cli import main
from rayinfer.errors import RunError
from rayinfer.models.memory import RUNTIME_MB, checkpoint_weights
from rayinfer.plan.job import plan_job
from rayinfer.run.admission import actor_need, check_resources
from rayinfer.testing import build_causal_lm, build_llama_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """One tiny Llama saved four ways: one safetensors file, safetensors in shards (float32, and
    bf16 on disk), and .bin shards with their index."""
    root = tmp_path_factory.mktemp("shards")
    base = build_causal_lm(root / "one")
    model = AutoModelForCausalLM.from_pretrained(base)
    model.save_pretrained(root / "st-shards-fp32", max_shard_size="40KB")
    write_bin_shards(model, root / "bin-shards", shards=3)
    model.to(torch.bfloat16).save_pretrained(root / "st-shards", max_shard_size="40KB")
    for folder in ("st-shards-fp32", "st-shards", "bin-shards"):
        for f in base.iterdir():
            if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
                (root / folder / f.name).write_bytes(f.read_bytes())
    return root, sum(p.numel() for p in model.parameters())


def write_bin_shards(model, folder, shards):
    """The pickled checkpoint layout transformers 5 no longer writes (save_pretrained writes
    safetensors only) but still reads: pytorch_model-0000k-of-0000n.bin and their index."""
    folder.mkdir(parents=True)
    model.config.dtype = torch.float32
    model.config.save_pretrained(folder)
    seen, state = set(), {}
    for k, v in model.state_dict().items():  # a tied weight once, as save_pretrained does
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            state[k] = v.contiguous()
    names = list(state)
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        name = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in part}, folder / name)
        weight_map.update({n: name for n in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))


def test_parameters_come_from_the_checkpoints_files_alone_sharded_or_not(shards):
    root, params = shards
    one = checkpoint_weights(root / "one")
    st = checkpoint_weights(root / "st-shards")
    binary = checkpoint_weights(root / "bin-shards", json.loads((root / "bin-shards" / "config.json").read_text()))
    assert len(list((root / "st-shards").glob("*.safetensors"))) > 2 and (root / "bin-shards" / "pytorch_model.bin.index.json").is_file()
    assert one.params == st.params == params  # tied embeddings are stored (and counted) once
    assert st.stored_bytes == 2 * params and "safetensors headers" in st.how
    # .bin: the index's total_size in the config's dtype
    assert binary.params == params and "the .bin index's total_size" in binary.how


def test_sharded_safetensors_and_sharded_bin_give_the_same_outputs(shards):
    """The same float32 weights as one safetensors file, as safetensors shards and as pickled .bin
    shards (read through torch's safe loader): the same perplexities, bit for bit, and the same
    greedy generations."""
    from rayinfer_tasks.generate import GenerateTask
    from rayinfer_tasks.perplexity import PerplexityTask

    from rayinfer.testing import english_sentences, run_task

    root, _ = shards
    texts = english_sentences()[:6]
    folders = ("one", "st-shards-fp32", "bin-shards")
    scored = {f: run_task(PerplexityTask, [{"text": t} for t in texts], root / f) for f in folders}
    made = {f: run_task(GenerateTask, [{"prompt": t} for t in texts[:3]], root / f, {"max_new_tokens": 12})
            for f in folders}
    assert len(list((root / "st-shards-fp32").glob("*.safetensors"))) > 2
    assert all(r["error"] is None and r["perplexity"] > 1 for r in scored["one"])
    assert scored["st-shards-fp32"] == scored["one"] == scored["bin-shards"]
    assert all(r["num_tokens"] > 0 for r in made["one"])
    assert made["st-shards-fp32"] == made["one"] == made["bin-shards"]


LOAD_PROBE = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
from rayinfer.models.load import LoadContext, load_model

def status():
    return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(("VmRSS", "RssAnon"))}

folder, dtype, how = sys.argv[1:4]
before = status()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM from here
if how == "rayinfer":
    model = load_model(LoadContext(model=folder, dtype=dtype, device="cpu"), AutoModelForCausalLM)
else:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
with torch.no_grad():
    logits = model(torch.arange(1, 33).reshape(2, 16)).logits
print(json.dumps({"peak_over": peak - before["VmRSS"], "anon_over": status()["RssAnon"] - before["RssAnon"],
                  "weights": sum(p.numel() * p.element_size() for p in model.parameters()), "logits": logits.tolist()}))
"""


def load_in_a_fresh_process(folder, dtype, how):
    ran = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(folder), dtype, how], capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    return json.loads(ran.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_bf16_checkpoint_loads_in_float32_at_about_one_copy(tmp_path):
    """transformers keeps every shard memory-mapped while it converts, so its peak is the converted
    weights plus the whole checkpoint. rayinfer's load closes each shard once it is read (small
    shards) or reads the tensors with pread (large ones): both save most of the checkpoint's size
    at the peak, with the same logits as transformers' own load. Where the dtypes agree the tensors
    stay the mapped pages themselves: the load copies none of them."""
    from rayinfer.models.reads import read_plan

    small = build_llama_shards(tmp_path / "small-shards", 512, 8, 1536, vocab_size=8000, shard_size="6MB")
    large = tmp_path / "large-shards"  # the same weights in 2 shards
    AutoModelForCausalLM.from_pretrained(small, dtype=torch.bfloat16).save_pretrained(large, max_shard_size="40MB")
    assert (read_plan(small, "float32"), read_plan(large, "float32"), read_plan(small, "bfloat16")) == (
        "release", "pread", None)
    stored = checkpoint_weights(small).stored_bytes  # 35M parameters, 70 MB
    plain = load_in_a_fresh_process(small, "float32", "transformers")
    for folder in (small, large):
        ours = load_in_a_fresh_process(folder, "float32", "rayinfer")
        assert ours["logits"] == plain["logits"] and ours["weights"] == plain["weights"] == 2 * stored
        assert plain["peak_over"] - ours["peak_over"] >= 0.6 * stored, (folder.name, ours["peak_over"], plain["peak_over"])
    mapped = load_in_a_fresh_process(small, "bfloat16", "rayinfer")
    besides = ours["anon_over"] - ours["weights"]  # what a load allocates besides its weights (the model's code...)
    assert mapped["anon_over"] < besides + 0.5 * mapped["weights"], (mapped["anon_over"], ours["anon_over"])


def test_validate_states_the_need_and_the_run_asks_ray_for_it(shards, tmp_path):
    root, params = shards
    (tmp_path / "in").mkdir()
    pq.write_table(__import__("pyarrow").table({"id": ["a"], "prompt": ["hello"]}), tmp_path / "in" / "p.parquet")
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"task": "generate", "model": str(root / "st-shards"), "input": {"path": str(tmp_path / "in")},
                               "output": {"path": str(tmp_path / "out")}, "runtime": {"device": "cpu"}}))
    shown = CliRunner().invoke(main, ["validate", str(job)])
    assert shown.exit_code == 0, shown.output
    line = next(ln for ln in shown.output.splitlines() if ln.startswith("ok: memory (CPU actors): "))
    assert f"model: {params / 1e3:.0f}K parameters, " in line and "in float32 per actor" in line
    assert "GPU actors" not in shown.output  # device: cpu
    plan = plan_job(str(job))
    need = plan.memory_need(0)
    assert need.weights_bytes == 4 * params and need.runtime_bytes == RUNTIME_MB * 10**6
    assert actor_need(plan)["memory"] == need.host_bytes  # what map_batches asks Ray for


def test_a_node_without_the_memory_of_one_actor_refuses_the_job_with_the_fixes(tmp_path, rayinfer_bert):
    """The fixes that apply, the one that helps most first: a pass budget beyond the node gets a
    smaller budget; the issue's 2.84B-parameter model in float32 gets bfloat16, a GPU, a larger node."""
    import dataclasses

    from rayinfer.models.memory import MemoryNeed, Weights

    plan = plan_job(fill_mask_job(tmp_path, rayinfer_bert, runtime={"max_batch_tokens": 4_000_000}))
    need = plan.memory_need(0)
    with pytest.raises(RunError) as refused:
        check_resources(plan, {"CPU": 4, "memory": 2e9}, [{"CPU": 2, "memory": 1e9}, {"CPU": 2, "memory": 1e9}])
    message = str(refused.value)
    assert message.startswith(f"no node can hold one actor: it needs about {need.host_bytes / 1e9:.1f} GB of memory "
                              f"(working memory {need.working_bytes / 1e9:.1f} GB, the runtime 0.8 GB, weights ")
    assert "the largest node offers 1.0 GB. Fixes: a smaller runtime.max_batch_tokens" in message
    assert "bfloat16" not in message  # the weights are not what is too big
    check_resources(plan, {"CPU": 4}, [{"CPU": 2}])  # a cluster that reports no memory: not judged by it

    params = 2_840_000_000
    big = MemoryNeed(Weights(params, 2 * params, "safetensors headers (6 files)"), "float32", 4 * params,
                     RUNTIME_MB * 10**6, 400_000_000)
    plan = dataclasses.replace(plan, memory={"cpu": big})
    with pytest.raises(RunError) as refused:
        check_resources(plan, {"CPU": 2, "memory": 10e9}, [{"CPU": 2, "memory": 10e9}])
    message = str(refused.value)
    assert message.startswith(
        "no node can hold one actor: it needs about 12.5 GB of memory (weights 11.4 GB (2.84B parameters in "
        "float32), the runtime 0.8 GB, working memory 0.4 GB), the largest node offers 10.0 GB. Fixes: "
        "runtime.dtype: bfloat16 (half the weights; fast where the CPU has avx512_bf16 or AMX: this one ")
    assert "; a GPU (runtime.num_gpus: 1: the weights and working memory go to it); a node with more memory" in message
    assert "max_batch_tokens" not in message


def test_a_job_the_local_ray_cannot_hold_is_one_line_before_any_actor(tmp_path, rayinfer_bert, ray_session):
    """On the session's Ray, whose node offers Ray's tasks its real memory: an actor whose working
    memory alone is beyond it (a 400M-token pass budget) is refused before any actor starts, in one
    line, and nothing is written."""
    job = fill_mask_job(tmp_path, rayinfer_bert, runtime={"max_batch_tokens": 400_000_000})
    ran = CliRunner().invoke(main, ["run", str(job), "--quiet"])
    errors = [ln for ln in ran.output.splitlines() if ln.startswith("rayinfer: error:")]
    assert ran.exit_code == 3 and len(errors) == 1, ran.output
    assert "rayinfer: error: no node can hold one actor: it needs about " in errors[0]
    assert "Fixes: a smaller runtime.max_batch_tokens" in errors[0]
    assert not list((tmp_path / "out").glob("part-*.parquet"))


HOG = '''
import os
import time

import numpy as np

from rayinfer import hookimpl
from rayinfer_tasks.fill_mask import FillMaskTask


class HogFillMask(FillMaskTask):
    name = "hog-fill-mask"
    description = "fill-mask, whose first RAYINFER_HOG_TIMES loads take RAYINFER_HOG_GB of memory more than the node has."

    def load(self):
        marker, times = os.environ["RAYINFER_HOG_MARKER"], int(os.environ["RAYINFER_HOG_TIMES"])
        done = int(open(marker).read()) if os.path.exists(marker) else 0
        if done < times:
            with open(marker, "w") as f:
                f.write(str(done + 1))
            held = np.ones(int(float(os.environ["RAYINFER_HOG_GB"]) * 1e9), dtype=np.uint8)  # every page written
            time.sleep(120)  # Ray's memory monitor kills this process long before
            del held
        super().load()


@hookimpl
def register_tasks(register):
    register(HogFillMask)
'''


def run_with_memory_monitor(job, site, marker, times):
    """``rayinfer run`` in its own process, whose embedded Ray's memory monitor kills workers once
    the node's memory use passes what it is now plus 2.5 GB; the task's load takes 4 GB more."""
    import os

    import psutil

    memory = psutil.virtual_memory()
    threshold = min(0.95, (memory.total - memory.available + 2.5e9) / memory.total)
    env = {**os.environ, "PYTHONPATH": str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "RAY_memory_usage_threshold": f"{threshold:.4f}", "RAY_memory_monitor_refresh_ms": "100",
           "RAYINFER_HOG_MARKER": str(marker), "RAYINFER_HOG_TIMES": str(times), "RAYINFER_HOG_GB": "4"}
    return subprocess.run([sys.executable, "-m", "rayinfer", "run", str(job), "--quiet"], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.mark.slow
def test_an_actor_ray_kills_for_memory_is_named_counted_and_ends_the_run_when_it_recurs(tmp_path, rayinfer_bert):
    """Ray's memory monitor (its real one, its threshold set near this machine's use) kills the
    actor's process while it loads the model: rayinfer names it in one line with the actor's need
    and the fixes, Ray starts the actor again, the job finishes with every row, and the manifest
    counts the death and the memory kill. Where every load is killed, the run stops after three,
    in one line, instead of loading forever."""
    from test_plugins import install_fake_dist

    site = tmp_path / "site"
    install_fake_dist(site, "rayinfer-hog", "rayinfer_hog", HOG)
    job = fill_mask_job(tmp_path, rayinfer_bert, task="hog-fill-mask")
    ran = run_with_memory_monitor(job, site, tmp_path / "once", times=1)
    assert ran.returncode == 0, ran.stderr[-3000:]
    killed = [ln for ln in ran.stderr.splitlines() if ln.startswith("rayinfer: Ray killed an actor's process")]
    assert len(killed) == 1, ran.stderr[-3000:]
    assert re.match(r"rayinfer: Ray killed an actor's process on [0-9.]+ \(pid \d+\) for memory while it "
                    r"loaded the model: the node's memory passed Ray's memory-monitor threshold\. Ray starts the actor "
                    r"again; an actor of this job needs about [0-9.]+ [GM]B of host memory \(the runtime .*\); if it "
                    r"recurs: fewer actors \(runtime\.actors\); a node with more memory$", killed[0]), killed[0]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["worker_deaths"] == 1 and manifest["worker_memory_kills"] == 1
    assert manifest["rows"] == len(pq.read_table(tmp_path / "out")) == 50 and manifest["errors"] == 0

    (tmp_path / "again").mkdir()
    job = fill_mask_job(tmp_path / "again", rayinfer_bert, task="hog-fill-mask")
    ran = run_with_memory_monitor(job, site, tmp_path / "always", times=99)
    assert ran.returncode != 0
    errors = [ln for ln in ran.stderr.splitlines() if ln.startswith("rayinfer: error:")]
    assert len(errors) == 1, ran.stderr[-3000:]
    assert ("rayinfer: error: an actor's process died 3 times on " in errors[0] and " while it loaded the model (the "
            "lines above say how; most often Ray's memory monitor kills it): the run stops rather than load it again; "
            "an actor of this job needs about " in errors[0]), errors[0]
    assert sum(ln.startswith("rayinfer: Ray killed an actor's process") for ln in ran.stderr.splitlines()) >= 2


def test_a_model_that_does_not_fit_its_gpu_is_refused_before_it_loads_with_the_fixes(tmp_path, rayinfer_bert):
    """The GPU check, on the numbers a GPU node's probe gives (this machine has none: the probe's
    own function answers None here): an 8B model in bf16 does not fit a 16 GB GPU (the model across
    2 GPUs does), nor half of a 24 GB one; it fits an 80 GB one. A small need asks no GPU at all."""
    import dataclasses

    from rayinfer.models.memory import MemoryNeed, Weights
    from rayinfer.run.admission import check_gpu_memory, gpu_properties, probe_gpu

    plan = plan_job(fill_mask_job(tmp_path, rayinfer_bert, runtime={"num_gpus": 1}))
    assert plan.memory_need(1).on_gpu and probe_gpu(plan) is None  # 0.1 GB: fits any GPU, no probe
    assert gpu_properties() is None  # no CUDA on this machine

    def with_need(num_gpus, params=8_030_000_000, working=1_000_000_000):
        need = MemoryNeed(Weights(params, 2 * params, "safetensors headers (4 files)"), "bfloat16", 2 * params,
                          RUNTIME_MB * 10**6, working, True, working)
        runtime = plan.spec.runtime.model_copy(update={"num_gpus": num_gpus})
        return dataclasses.replace(plan, memory={"gpu": need}, spec=plan.spec.model_copy(update={"runtime": runtime}))

    check_gpu_memory(with_need(1), ("NVIDIA H100 80GB HBM3", 85_000_000_000))
    check_gpu_memory(with_need(2), ("Tesla T4", 15_360_000_000))  # 8 GB of weights on each
    with pytest.raises(RunError) as refused:
        check_gpu_memory(with_need(1), ("Tesla T4", 15_360_000_000))
    assert str(refused.value) == (
        "one actor's model does not fit the GPU memory it gets: it needs about 17.1 GB per GPU (weights 16.1 GB "
        "(8.03B parameters in bfloat16), working memory 1.0 GB), and its GPU holds 13.8 GB (Tesla T4, 15.4 GB; 90% "
        "usable). Fixes: runtime.num_gpus: 2 (the model across 2 GPUs of a node); GPUs with more memory")
    with pytest.raises(RunError) as refused:
        check_gpu_memory(with_need(0.5, working=5_000_000_000), ("NVIDIA L4", 24_000_000_000))
    assert "and 0.5 of a GPU holds 10.8 GB (NVIDIA L4, 24.0 GB; 90% usable). Fixes: a whole GPU per actor " in str(
        refused.value)
    assert str(refused.value).endswith("runtime.num_gpus: 2 (the model across 2 GPUs of a node); a smaller "
                                       "runtime.max_batch_tokens (its working memory: 5.0 GB); GPUs with more memory")
    check_gpu_memory(with_need(1), None)  # no GPU answered: not judged
