"""`rayinfer validate`: every user error is caught before Ray starts, with a clear message."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers import fill_mask_job

from rayinfer.cli import main
from rayinfer.io.location import nested
from rayinfer.testing import write_dataset


def validate(job, *args):
    result = CliRunner().invoke(main, ["validate", str(job), *args])
    assert "Traceback" not in result.output
    return result


def test_a_good_job_validates(tmp_path, rayinfer_bert):
    result = validate(fill_mask_job(tmp_path, rayinfer_bert))
    assert result.exit_code == 0, result.output
    assert "2 file(s), 50 rows" in result.output
    assert "doc_id, source, predictions, filled, error" in result.output


@pytest.mark.parametrize(
    "overrides, message",
    [
        pytest.param(["input.columns.text=body"], "column 'body' is not in the input. Columns: doc_id, sentence, source", id="column-not-in-input"),
        pytest.param(["input.keep=[nope]"], "input.keep: column 'nope' is not in the input", id="keep-column-missing"),
        pytest.param(["input.id_column=doc_id"], None, id="any-unique-column-is-an-id"),  # any column can be the id: valid
        pytest.param(["input.id_column=source"], "43 row(s) repeat an id of another row (7 distinct id(s) in column 'source'",
                     id="a-column-whose-values-repeat-is-no-id"),
        pytest.param(["input.id_column=source", "input.duplicate_ids=allow"], None, id="unless-repeats-are-allowed"),
        pytest.param(["input.columns={text: doc_id}"], "column 'doc_id' must be a string column, but it is int64", id="text-column-not-string"),
        pytest.param(["task=summarise"], "unknown task 'summarise'. Known tasks: classify, embed, fill-mask", id="unknown-task"),
        pytest.param(["options.top_k=0"], "options.top_k: Input should be greater than or equal to 1 (got 0)", id="option-out-of-range"),
        pytest.param(["options.topk=3"], "unknown key 'options.topk' (did you mean 'options.top_k'?)", id="misspelt-option"),
        pytest.param(["runtime.batchsize=3"], "unknown key 'runtime.batchsize' (did you mean 'runtime.batch_size'?)", id="misspelt-runtime-key"),
        pytest.param(["runtime.batch_size=lots"], "runtime.batch_size: Input should be a valid integer", id="runtime-not-an-integer"),
        pytest.param(["runtime.actors={min: 3, max: 1}"], "max (1) must be >= min (3)", id="actors-max-below-min"),
        pytest.param(["model=/no/such/model"], "model folder '/no/such/model' does not exist", id="model-folder-missing"),
        pytest.param(["input.path=/no/such/data"], "input.path '/no/such/data' does not exist", id="input-missing"),
        pytest.param(["output.mode=sometimes"], "output.mode: Input should be 'error', 'overwrite' or 'resume'", id="bad-output-mode"),
        pytest.param(["output.path=s3://bucket/out?secret_key=abc"], "carries credentials in the URI (secret_key)", id="credentials-in-output-uri"),
        pytest.param(["input.path=s3://bucket/in?access_key=a&secret_key=b"], "input.path 's3://bucket/in?access_key=***&secret_key=***'", id="credentials-redacted-in-messages"),
        pytest.param(["output.path=nope://bucket/out"], "output.path 'nope://bucket/out': cannot open it", id="unknown-uri-scheme"),
    ],
)
def test_bad_specs_are_rejected_with_clear_messages(tmp_path, rayinfer_bert, overrides, message):
    job = fill_mask_job(tmp_path, rayinfer_bert)
    result = validate(job, *[a for o in overrides for a in ("--set", o)])
    if message is None:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2, result.output
    assert result.output.startswith("rayinfer: error: ")
    assert message in result.output


def test_model_folder_without_config_or_weights(tmp_path, rayinfer_bert):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    result = validate(fill_mask_job(tmp_path, rayinfer_bert), "--set", f"model={empty}")
    assert result.exit_code == 2 and "has no config.json" in result.output
    (empty / "config.json").write_text(json.dumps({"model_type": "bert"}))
    result = validate(tmp_path / "job.yaml", "--set", f"model={empty}")
    assert result.exit_code == 2 and "has no weights" in result.output


def test_task_checks_the_model_head(tmp_path, rayinfer_bert):
    result = validate(fill_mask_job(tmp_path, rayinfer_bert), "--set", "task=classify")
    assert result.exit_code == 2
    assert "classify needs a sequence-classification head, but the model is BertForMaskedLM" in result.output


def test_existing_output_is_refused_unless_overwrite(tmp_path, rayinfer_bert):
    job = fill_mask_job(tmp_path, rayinfer_bert)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    result = validate(job)
    assert result.exit_code == 2 and "is not empty" in result.output
    result = validate(job, "--set", "output.mode=overwrite")
    assert result.exit_code == 2 and "holds files rayinfer did not write (notes.txt)" in result.output


def test_malformed_yaml_and_missing_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    result = validate(bad)
    assert result.exit_code == 2 and "not valid YAML" in result.output
    bad.write_text("task: fill-mask\n")
    result = validate(bad)
    assert result.exit_code == 2
    assert "model: required but missing" in result.output and "input: required but missing" in result.output
    assert "validate" in CliRunner().invoke(main, ["--help"]).output


def test_corrupt_parquet_file_is_named(tmp_path, rayinfer_bert):
    job = fill_mask_job(tmp_path, rayinfer_bert)
    (tmp_path / "in" / "part-0001.parquet").write_bytes(b"PAR1 this is not parquet")
    result = validate(job)
    assert result.exit_code == 2
    assert "part-0001.parquet" in result.output and "not a readable Parquet file" in result.output


def test_run_with_a_bad_spec_exits_2_and_writes_nothing(tmp_path, rayinfer_bert):
    job = fill_mask_job(tmp_path, rayinfer_bert)
    for overrides, message in [
        (["options.top_k=0"], "options.top_k"),
        (["input.columns.text=doc_id"], "must be a string column"),
        ([f"model={tmp_path}"], "has no config.json"),
    ]:
        result = CliRunner().invoke(main, ["run", str(job), *[a for o in overrides for a in ("--set", o)]])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "output, input_path",
    [
        pytest.param("{tmp}/in/out", "{tmp}/in", id="output-inside-input"),
        pytest.param("{tmp}/in", "{tmp}/in", id="the-same-folder"),
        pytest.param("{tmp}", "{tmp}/in", id="input-inside-output"),
        pytest.param("{tmp}/in/out", "{tmp}/in/**/*.parquet", id="a-recursive-glob-reaching-the-output"),
        pytest.param("{tmp}/in/out", "{tmp}/in/*/*.parquet", id="a-glob-whose-folder-wildcard-reaches-it"),
        pytest.param("{tmp}/in", "{tmp}/in/*.parquet", id="a-glob-matching-inside-the-output"),
        pytest.param("{tmp}/link/out", "{tmp}/in", id="through-a-symlink"),
    ],
)
def test_output_and_input_must_not_overlap(tmp_path, rayinfer_bert, output, input_path):
    """A run reading `data` and writing `data/out` would read its own parts as input next time
    (4,000 rows out of a 2,000-row corpus); refused before Ray starts, nothing written."""
    job = fill_mask_job(tmp_path, rayinfer_bert)
    (tmp_path / "link").symlink_to(tmp_path / "in")
    before = sorted(p.name for p in (tmp_path / "in").iterdir())
    overrides = [f"output.path={output.format(tmp=tmp_path)}", f"input.path={input_path.format(tmp=tmp_path)}"]
    result = CliRunner().invoke(main, ["run", str(job), *[a for o in overrides for a in ("--set", o)]])
    assert result.exit_code == 2, result.output
    assert "overlap: a later run would read the output parts as input" in result.output
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("pattern, output, reaches", [
    ("d/in-*.parquet", "d/predictions", False),
    ("d/*.parquet", "d/in/out", False),
    ("d/predictions*", "d/predictions", False),  # matches the folder itself, never a file in it
    ("d/**/*.parquet", "d/predictions2", True),
    ("d/*/*.parquet", "d/predictions", True),
    ("d/p*/x.parquet", "d/predictions", True),
    ("d/**", "d/x", True),
    ("d/*.parquet", "d", True),
    ("d/*.parquet", ".", True),
    ("d/in-*.parquet", "e/predictions", False),
])
def test_a_glob_overlaps_only_what_it_can_match(tmp_path, pattern, output, reaches):
    """A glob is judged by the paths it can match, not by the folder above its first wildcard."""
    assert nested(str(tmp_path / pattern), str(tmp_path / output)) is reaches
    assert nested(str(tmp_path / output), str(tmp_path / pattern)) is reaches


def test_an_output_path_that_is_a_file_is_refused(tmp_path, rayinfer_bert):
    job = fill_mask_job(tmp_path, rayinfer_bert)
    (tmp_path / "out").write_text("a file")
    result = validate(job)
    assert result.exit_code == 2 and "exists and is not a folder" in result.output


def test_an_actor_that_no_node_can_hold_fails_fast(tmp_path, rayinfer_bert):
    """Totals are not enough: 3 CPUs per actor on two 2-CPU nodes can never be placed."""
    from rayinfer.api import plan_job
    from rayinfer.errors import RunError
    from rayinfer.run.admission import check_resources

    plan = plan_job(fill_mask_job(tmp_path, rayinfer_bert, runtime={"num_cpus": 3}))
    with pytest.raises(RunError, match=r"no node can hold one actor \(CPU=3\); nodes have: CPU=2; CPU=2"):
        check_resources(plan, {"CPU": 4}, [{"CPU": 2}, {"CPU": 2}])
    check_resources(plan, {"CPU": 5.5}, [{"CPU": 2}, {"CPU": 3.5}])  # one node fits: fine


def test_a_fixed_pool_must_fit_the_local_ray(tmp_path, rayinfer_bert, caplog):
    """Three 1-CPU actors on a 2-CPU local Ray would wait out actor_start_timeout_s: that run
    fails before any row is read; a cluster may grow, so there it is a warning. Actors read their
    own units, so two 1-CPU actors fit on 2 CPUs (no read task needs a CPU beside them)."""
    from rayinfer.api import plan_job
    from rayinfer.errors import RunError
    from rayinfer.run.admission import actors_that_fit, check_pool_fits, pool_size

    assert actors_that_fit({"CPU": 1}, [{"CPU": 2}]) == 2
    assert actors_that_fit({"CPU": 1}, [{"CPU": 2}, {"CPU": 1.5}]) == 3
    assert actors_that_fit({"CPU": 1, "slot": 1}, [{"CPU": 2, "slot": 1}, {"CPU": 1, "slot": 1}]) == 2
    assert actors_that_fit({"CPU": 1, "GPU": 0.5}, [{"CPU": 16, "GPU": 1}]) == 2
    assert actors_that_fit({"CPU": 0.5}, [{"CPU": 2}]) == 4
    assert actors_that_fit({"CPU": 1, "GPU": 1}, [{"CPU": 16}]) == 0

    plan = plan_job(fill_mask_job(tmp_path, rayinfer_bert, runtime={"actors": 3, "num_cpus": 1}))
    with pytest.raises(RunError, match=r"runtime.actors asks for 3 actors of CPU=1 from the start; the local Ray "
                                       r"holds 2\. Set runtime.actors to at most 2"):
        check_pool_fits(plan, 3, [{"CPU": 2}], can_grow=False)
    with caplog.at_level("WARNING", logger="rayinfer"):
        check_pool_fits(plan, 3, [{"CPU": 2}], can_grow=True)
    assert "waiting up to runtime.actor_start_timeout_s=900s for more nodes" in caplog.text
    check_pool_fits(plan, 3, [{"CPU": 3}], can_grow=False)  # fits: fine

    # unset actors: every actor the cluster holds; all from the start on the local Ray
    unset = plan_job(fill_mask_job(tmp_path, rayinfer_bert, runtime={"num_cpus": 0.5, "actors": None}))
    assert pool_size(unset, {"CPU": 2}, can_grow=False) == (4, 4)
    assert pool_size(unset, {"CPU": 2}, can_grow=True) == (1, 4)


def test_a_generation_task_gets_work_cut_for_decoding(tmp_path, rayinfer_llama, rayinfer_bert):
    """Unset runtime.num_cpus: a decoding task (generate) on CPUs gets one actor with a node's
    CPUs (its torch threads follow), up to 8; an encoder task 1 CPU per actor; a num_cpus the
    spec sets is kept, and GPU actors keep 1. A decoding task's units are never cut below 64 rows
    (48 prompts on 2 actors were 8 units of 6)."""
    from rayinfer.api import plan_job
    from rayinfer.plan.work import unit_rows
    from rayinfer.run.admission import placed, pool_size
    from rayinfer.run.cluster import actor_args

    write_dataset(tmp_path / "in", {"id": list(range(48)), "prompt": ["Say hello."] * 48})

    def plan(task: str, model, **runtime):
        spec = {"task": task, "model": str(model), "input": {"path": str(tmp_path / "in")},
                "output": {"path": str(tmp_path / "out")}, "runtime": runtime}
        if task == "fill-mask":
            spec["input"]["columns"] = {"text": "prompt"}
        return plan_job(spec)

    gen = placed(plan("generate", rayinfer_llama), [{"CPU": 2}])
    assert gen.spec.runtime.num_cpus == 2 and pool_size(gen, {"CPU": 2}, can_grow=False) == (1, 1)
    assert actor_args(gen, str(tmp_path / "out"), "r")["context"].num_threads == 2
    assert placed(plan("generate", rayinfer_llama), [{"CPU": 64}, {"CPU": 4}]).spec.runtime.num_cpus == 8
    assert placed(plan("generate", rayinfer_llama, num_cpus=1), [{"CPU": 2}]).spec.runtime.num_cpus == 1
    assert placed(plan("generate", rayinfer_llama, num_gpus=1), [{"CPU": 8, "GPU": 1}]).spec.runtime.num_cpus == 1
    assert placed(plan("fill-mask", rayinfer_bert), [{"CPU": 2}]).spec.runtime.num_cpus == 1
    assert unit_rows(48, 2, 100_000, decodes=True) == 64 and unit_rows(48, 2, 100_000) == 6
    assert unit_rows(3000, 8, 100_000, decodes=True) == 94


def test_num_gpus_unset_is_one_per_actor_where_the_cluster_has_gpus_and_the_device_follows_rays_gpu_ids(
        tmp_path, rayinfer_bert, monkeypatch):
    """An actor computes on the GPUs Ray gave it and on nothing else: with runtime.num_gpus left
    at 0 on a GPU node, each of a CPU-sized pool's actors saw CUDA and put its model on cuda:0. Now
    unset is 1 per actor where a node has a GPU (0 without one, or with runtime.device: cpu), and
    device: auto is CUDA only in an actor holding Ray GPU ids, whatever torch can see."""
    from dataclasses import replace

    import torch

    from rayinfer.api import plan_job
    from rayinfer.models.load import LoadContext, actor_context, device_report
    from rayinfer.run.admission import gpu_choice, placed, pool_size

    def plan(**runtime):
        return plan_job(fill_mask_job(tmp_path, rayinfer_bert, runtime={"actors": None, **runtime}))

    gpu_nodes = [{"CPU": 16, "GPU": 2}, {"CPU": 8}]
    assert placed(plan(), gpu_nodes).spec.runtime.num_gpus == 1
    assert pool_size(placed(plan(), gpu_nodes), {"CPU": 24, "GPU": 2}, can_grow=False) == (2, 2)  # one per GPU
    assert placed(plan(), [{"CPU": 2}]).spec.runtime.num_gpus == 0
    assert placed(plan(device="cpu"), gpu_nodes).spec.runtime.num_gpus == 0
    assert placed(plan(num_gpus=0.5), gpu_nodes).spec.runtime.num_gpus == 0.5
    assert gpu_choice(plan().spec.runtime, 1.0, gpu_nodes) == (
        "runtime.num_gpus unset: 1 GPU per actor (the cluster has 2); set runtime.num_gpus: 0.5 to put two actors on "
        "each GPU, or runtime.device: cpu to compute on CPUs")
    assert gpu_choice(plan(device="cpu").spec.runtime, 0.0, gpu_nodes) == (
        "runtime.device is cpu: the actors take no GPU (the cluster has 2)")
    assert gpu_choice(plan().spec.runtime, 0.0, [{"CPU": 2}]) is None
    assert gpu_choice(plan(num_gpus=1).spec.runtime, 1.0, gpu_nodes) is None  # the spec's own choice

    ctx = LoadContext(model=str(rayinfer_bert))
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node: torch sees CUDA in every actor
        assert actor_context(ctx, [], "10.0.0.1").device == "cpu"
        assert actor_context(ctx, ["1"], "10.0.0.1").device == "cuda"
        assert actor_context(replace(ctx, device="cpu"), ["1"], "10.0.0.1").device == "cpu"
    assert device_report(actor_context(ctx, [], "10.0.0.1")) == {"device": "cpu", "dtype": "float32"}
    assert device_report(replace(ctx, device="cpu", dtype="bfloat16")) == {"device": "cpu", "dtype": "bfloat16"}

    result = validate(fill_mask_job(tmp_path, rayinfer_bert))
    assert "ok: runtime: 1 GPU per actor where the cluster has GPUs, else none (runtime.num_gpus unset); device auto, " \
           "dtype auto" in result.output
    result = validate(fill_mask_job(tmp_path, rayinfer_bert, runtime={"device": "cuda", "num_gpus": 0}))
    assert result.exit_code == 2 and "device is 'cuda' but num_gpus is 0: an actor computes only on the GPUs Ray " \
                                     "gives it" in result.output
