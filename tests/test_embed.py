"""embed: parity with SentenceTransformer.encode on the model's own module stack (mean, CLS + Dense
+ a query prompt, last-token pooling of a decoder, a plain encoder), options, errors before Ray,
and a job whose Parquet column is a fixed-size vector."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rayinfer_tasks.embed import EmbedTask
from sentence_transformers import SentenceTransformer, quantize_embeddings

from rayinfer.errors import SpecError
from rayinfer.models import catalog
from rayinfer.testing import english_paragraphs, run_task

PARAGRAPHS = list(english_paragraphs()[:300])
MINILM = "all-minilm-l6-v2"
NEEDS_MINILM = pytest.mark.skipif(not catalog.is_installed(MINILM), reason=f"rayinfer models fetch {MINILM}")


def embed(model, texts, options=None, **kw):
    rows = run_task(EmbedTask, [{"text": t} for t in texts], model, options or {}, **kw)
    assert [r["error"] for r in rows] == [None] * len(texts)
    return rows, np.array([r["embedding"] for r in rows])


def save_stack(folder, transformer_dir, pooling, dense=None, normalize=False, prompts=None, include_prompt=True):
    """A sentence-transformers folder as sentence-transformers itself saves one."""
    import torch
    from sentence_transformers import models

    torch.manual_seed(0)
    first = models.Transformer(str(transformer_dir), max_seq_length=64)
    if first.tokenizer.pad_token is None:  # a decoder's tokenizer: eos pads, as decoder embedders ship
        first.tokenizer.pad_token = first.tokenizer.eos_token
    dim = first.get_embedding_dimension()
    stack = [first, models.Pooling(dim, pooling_mode=pooling, include_prompt=include_prompt)]
    if dense:
        stack.append(models.Dense(dim, dense, activation_function=torch.nn.Tanh()))
    if normalize:
        stack.append(models.Normalize())
    SentenceTransformer(modules=stack, prompts=prompts or {}).save(str(folder))
    return folder


@pytest.fixture(scope="module")
def cls_dense_query(tmp_path_factory, rayinfer_bert):
    """The BGE shape: CLS pooling, then a Dense projection (to 24 dims), and a query prompt."""
    return save_stack(tmp_path_factory.mktemp("st") / "cls", rayinfer_bert, "cls", dense=24,
                      prompts={"query": "query: ", "document": ""})


@pytest.fixture(scope="module")
def lasttoken(tmp_path_factory, rayinfer_llama):
    """The e5-mistral / Qwen3-Embedding shape: a decoder's last token, normalized, an instruction
    prompt left out of nothing (last-token pooling sees the whole text)."""
    return save_stack(tmp_path_factory.mktemp("st") / "last", rayinfer_llama, "lasttoken", normalize=True,
                      prompts={"query": "Instruct: find the passage\nQuery: "})


@pytest.fixture(scope="module")
def mean_without_prompt(tmp_path_factory, rayinfer_bert):
    """INSTRUCTOR's shape: the prompt is read but left out of the mean (include_prompt: false)."""
    return save_stack(tmp_path_factory.mktemp("st") / "meanx", rayinfer_bert, "mean", include_prompt=False,
                      prompts={"query": "represent the question for retrieval: "})


@NEEDS_MINILM
@pytest.mark.slow
def test_all_minilm_equals_encode_on_300_paragraphs():
    folder = str(catalog.model_dir(MINILM))
    reference = SentenceTransformer(folder, device="cpu")
    rows, got = embed(folder, PARAGRAPHS)
    assert got.shape == (300, 384)
    assert np.abs(got - reference.encode(PARAGRAPHS)).max() <= 1e-5
    assert np.linalg.norm(got, axis=1) == pytest.approx(np.ones(300), abs=1e-5)  # its Normalize module
    # 256 tokens is its max_seq_length: the rows cut there say so
    lengths = [len(reference.tokenizer(t)["input_ids"]) for t in PARAGRAPHS]
    assert [r["truncated"] for r in rows] == [n > 256 for n in lengths] and any(n > 256 for n in lengths)
    _, short = embed(folder, PARAGRAPHS, {"truncate_dim": 64})
    assert np.abs(short - reference.encode(PARAGRAPHS, truncate_dim=64)).max() <= 1e-5


@pytest.mark.parametrize("stack, prompt_name", [("cls_dense_query", "query"), ("cls_dense_query", None),
                                                ("lasttoken", "query"), ("mean_without_prompt", "query")])
def test_the_model_stack_equals_encode(request, stack, prompt_name):
    folder = request.getfixturevalue(stack)
    reference = SentenceTransformer(str(folder), device="cpu")
    options = {"prompt_name": prompt_name} if prompt_name else {}
    rows, got = embed(folder, PARAGRAPHS, options, max_batch_tokens=512)
    want = reference.encode(PARAGRAPHS, prompt_name=prompt_name)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5
    if prompt_name:  # the prompt changes the vectors: it was applied, not ignored
        assert np.abs(got - reference.encode(PARAGRAPHS)).max() > 1e-3


def test_a_plain_encoder_is_mean_pooled_as_sentence_transformers_does(rayinfer_bert):
    _, got = embed(rayinfer_bert, PARAGRAPHS[:100])
    want = SentenceTransformer(str(rayinfer_bert), device="cpu").encode(PARAGRAPHS[:100])
    assert np.abs(got - want).max() <= 1e-5


def test_an_adapter_is_merged_into_the_stacks_transformer(cls_dense_query, rayinfer_bert, tmp_path):
    """A LoRA adapter on the encoder (FEATURE_EXTRACTION) changes the vectors exactly as merging it
    into the folder's transformer does."""
    from peft import PeftModel
    from test_adapters import make_lora
    from transformers import AutoModel

    adapter = make_lora(rayinfer_bert, tmp_path / "lora", AutoModel, "FEATURE_EXTRACTION", ["query", "value"])
    reference = SentenceTransformer(str(cls_dense_query), device="cpu")
    plain = reference.encode(PARAGRAPHS[:40])
    reference[0].model = PeftModel.from_pretrained(reference[0].model, str(adapter)).merge_and_unload()
    _, got = embed(cls_dense_query, PARAGRAPHS[:40], adapter=str(adapter))
    want = reference.encode(PARAGRAPHS[:40])
    assert np.abs(got - want).max() <= 1e-5 and np.abs(got - plain).max() > 1e-3


def test_normalize_truncate_and_quantized_precisions(cls_dense_query):
    reference = SentenceTransformer(str(cls_dense_query), device="cpu")
    texts = PARAGRAPHS[:80]
    raw = reference.encode(texts, prompt_name="query")
    _, unit = embed(cls_dense_query, texts, {"prompt_name": "query", "normalize": True, "truncate_dim": 16})
    want = reference.encode(texts, prompt_name="query", normalize_embeddings=True, truncate_dim=16)
    assert np.abs(unit - want).max() <= 1e-5 and np.linalg.norm(unit, axis=1) == pytest.approx(np.ones(80), abs=1e-5)

    rows, half = embed(cls_dense_query, texts, {"prompt_name": "query", "precision": "float16"})
    assert np.abs(half.astype(np.float32) - raw).max() <= 1e-3
    ranges = [raw.min(axis=0).tolist(), raw.max(axis=0).tolist()]
    for precision in ("int8", "uint8"):
        _, got = embed(cls_dense_query, texts, {"prompt_name": "query", "precision": precision, "int8_ranges": ranges})
        want = quantize_embeddings(raw, precision, ranges=np.array(ranges))
        assert got.dtype == want.dtype and np.abs(got.astype(int) - want.astype(int)).max() <= 1  # a float's last bit
    for precision in ("binary", "ubinary"):
        _, got = embed(cls_dense_query, texts, {"prompt_name": "query", "precision": precision})
        assert got.shape == (80, 3) and (got == quantize_embeddings(raw, precision)).all()


def test_a_job_writes_fixed_size_vectors(tmp_path, cls_dense_query, ray_session):
    """Parquet in, a fixed_size_list<float32>[24] column out with every id; DuckDB ranks by cosine."""
    import duckdb

    from rayinfer.api import run_job

    (tmp_path / "in").mkdir()
    texts = PARAGRAPHS[:60]
    pq.write_table(pa.table({"doc": [f"p{i}" for i in range(60)], "body": texts[:59] + [""]}),
                   tmp_path / "in" / "docs.parquet")
    spec = {"task": "embed", "model": str(cls_dense_query), "options": {"prompt_name": "query"},
            "input": {"path": str(tmp_path / "in"), "id_column": "doc", "columns": {"text": "body"}},
            "output": {"path": str(tmp_path / "out")}, "runtime": {"num_cpus": 1, "actors": 1}}
    manifest = run_job(spec)
    assert manifest["rows"] == 60 and manifest["errors"] == 1
    table = pq.read_table(tmp_path / "out")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 24)
    out = {r["doc"]: r for r in table.to_pylist()}
    assert sorted(out) == sorted(f"p{i}" for i in range(60))
    assert out["p59"]["error"] == "input 'text' (column 'body') is empty" and out["p59"]["embedding"] is None
    want = SentenceTransformer(str(cls_dense_query), device="cpu").encode(texts[:59], prompt_name="query")
    assert np.abs(np.array([out[f"p{i}"]["embedding"] for i in range(59)]) - want).max() <= 1e-5

    query = want[3].tolist()
    best = duckdb.sql(
        f"SELECT doc FROM read_parquet('{tmp_path}/out/*.parquet') WHERE error IS NULL "
        f"ORDER BY array_cosine_similarity(embedding::FLOAT[24], {query}::FLOAT[24]) DESC LIMIT 1").fetchall()
    assert best == [("p3",)]


@pytest.mark.parametrize("options, message", [
    ({"prompt_name": "passage"}, "options.prompt_name 'passage': the model's prompts are document, query"),
    ({"truncate_dim": 25}, "options.truncate_dim 25 is more than the model's 24 dimensions"),
    ({"dimensions": 32}, "options.dimensions is 32, but the model's vectors have 24"),
    ({"precision": "int8", "int8_ranges": [[0.0], [1.0]]}, "options.int8_ranges has 1 values per row; the vectors have 24"),
])
def test_options_the_model_cannot_serve_are_refused_before_ray(tmp_path, cls_dense_query, options, message):
    from rayinfer.api import plan_job

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [1], "text": ["x"]}), tmp_path / "in" / "a.parquet")
    spec = {"task": "embed", "model": str(cls_dense_query), "options": options,
            "input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")}}
    with pytest.raises(SpecError, match=message):
        plan_job(spec)
    assert plan_job({**spec, "options": {}}).output_schema.field("embedding").type == pa.list_(pa.float32(), 24)


def test_conflicting_options_are_spec_errors():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="set prompt or prompt_name, not both"):
        EmbedTask.Options(prompt="q: ", prompt_name="query")
    with pytest.raises(ValidationError, match="int8_ranges is for precision int8 or uint8"):
        EmbedTask.Options(int8_ranges=[[0.0], [1.0]])


@pytest.mark.parametrize("model, least_cosine", [("cls_dense_query", 0.998), ("lasttoken", 0.995),
                                                 pytest.param(MINILM, 0.9999, marks=NEEDS_MINILM)])
@pytest.mark.slow
def test_bfloat16_vectors_point_where_fp32_encode_does(request, model, least_cosine):
    """runtime.dtype bfloat16 (the README's lever for avx512_bf16 / AMX CPUs): float32 vectors
    out, each within a small angle of fp32 encode's (all-MiniLM: cosine >= 0.9999, as the README
    says), and not equal to them (the dtype was applied); a model that normalizes gives unit
    vectors still (its Normalize, run in bf16, is off by up to 0.4%: rayinfer's is fp32)."""
    folder = str(catalog.model_dir(MINILM) if model == MINILM else request.getfixturevalue(model))
    want = SentenceTransformer(folder, device="cpu").encode(PARAGRAPHS)
    _, got = embed(folder, PARAGRAPHS, dtype="bfloat16")
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert got.dtype == np.float32 and got.shape == want.shape
    assert cosine.min() >= least_cosine and np.abs(got - want).max() > 1e-4
    if model != "cls_dense_query":  # the two stacks that end in Normalize
        assert np.abs(np.linalg.norm(got, axis=1) - 1).max() <= 1e-5


def unique_copy(folder, into):
    """``folder`` copied with a file of its own, so that its fingerprint (and ONNX cache entry) is
    this test's alone: the export below is this run's, not one an earlier session left."""
    import shutil
    import uuid

    shutil.copytree(folder, into)
    (into / "rayinfer_test_nonce.json").write_text(f'{{"nonce": "{uuid.uuid4()}"}}')
    return into


def onnx_entries(manifest):
    import shutil
    from pathlib import Path

    files = {d["onnx_file"] for d in manifest["actor_devices"].values()}
    return files, lambda: [shutil.rmtree(Path(f).parent, ignore_errors=True) for f in files]


@pytest.mark.parametrize("stack, prompt_name", [("cls_dense_query", "query"), ("mean_without_prompt", "query"),
                                                ("lasttoken", "query")])
def test_the_onnxruntime_engine_equals_encode(request, stack, prompt_name, tmp_path, monkeypatch):
    """The stack's transformer through ONNX Runtime, its pooling, Dense and Normalize as they are:
    the vectors within 1e-5 of SentenceTransformer.encode (a decoder's last token too)."""
    monkeypatch.setenv("RAYINFER_HOME", str(tmp_path / "home"))  # the export cache: this test's own
    folder = unique_copy(request.getfixturevalue(stack), tmp_path / "stack")
    want = SentenceTransformer(str(folder), device="cpu").encode(PARAGRAPHS[:120], prompt_name=prompt_name)
    _, got = embed(folder, PARAGRAPHS[:120], {"prompt_name": prompt_name}, max_batch_tokens=512,
                   engine="onnxruntime")  # no plan: the export is named by the folder's own fingerprint
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5


@NEEDS_MINILM
@pytest.mark.slow
def test_all_minilm_on_onnxruntime_equals_encode():
    """The issue's model: 300 paragraphs (some cut at its 256 tokens) within 1e-5 of encode."""
    from rayinfer.models.locate import fingerprint_folder

    folder = str(catalog.model_dir(MINILM))
    _, got = embed(folder, PARAGRAPHS, engine="onnxruntime", fingerprint=fingerprint_folder(catalog.model_dir(MINILM)))
    assert np.abs(got - SentenceTransformer(folder, device="cpu").encode(PARAGRAPHS)).max() <= 1e-5


def test_an_export_is_named_by_the_weights_it_holds(rayinfer_bert, rayinfer_llama, tmp_path):
    """The cache key: the plan's fingerprint; else the folders' (the adapter's too, and whether it
    is merged); else a digest of the loaded weights. Two models never share an export."""
    from types import SimpleNamespace

    import torch

    from rayinfer.models.load import LoadContext
    from rayinfer.models.onnx import weights_identity

    small, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert weights_identity(LoadContext(model=str(rayinfer_bert), fingerprint="f"), small) == "f|merged=None"
    local = weights_identity(LoadContext(model=str(rayinfer_bert)), small)
    assert local == weights_identity(LoadContext(model=str(rayinfer_bert)), other)  # the files say, not the object
    assert local != weights_identity(LoadContext(model=str(rayinfer_llama)), small)
    adapted = weights_identity(LoadContext(model=str(rayinfer_bert), adapter=str(rayinfer_llama)), small)
    assert adapted != local and adapted != weights_identity(
        LoadContext(model=str(rayinfer_bert), adapter=str(rayinfer_llama), merge_adapter=False), small)
    hub = SimpleNamespace(fingerprint=None, model="org/encoder", adapter=None, merge_adapter=True)
    assert weights_identity(hub, small) != weights_identity(hub, other)  # the weights themselves


def test_two_actors_export_once_and_a_second_job_reads_the_export(tmp_path, cls_dense_query, ray_session):
    """A job of two actors on ONNX Runtime: one exports the model (the other waits for it and
    reads it), the vectors equal encode's; a second job of the same model exports nothing."""
    from rayinfer.api import run_job

    folder = unique_copy(cls_dense_query, tmp_path / "stack")
    pq.write_table(pa.table({"doc": list(range(80)), "body": PARAGRAPHS[:80]}), tmp_path / "docs.parquet")
    want = SentenceTransformer(str(folder), device="cpu").encode(PARAGRAPHS[:80])
    cleanups = []
    try:
        for run, expected in (("first", ["exported"]), ("second", ["read from the cache"] * 2)):
            spec = {"task": "embed", "model": str(folder), "input": {"path": str(tmp_path / "docs.parquet"),
                    "id_column": "doc", "columns": {"text": "body"}}, "output": {"path": str(tmp_path / run)},
                    "runtime": {"engine": "onnxruntime", "actors": 2, "num_cpus": 1}}
            manifest = run_job(spec)
            files, cleanup = onnx_entries(manifest)
            cleanups.append(cleanup)
            said = sorted(d["onnx"].split(" in ")[0] for d in manifest["actor_devices"].values())
            if run == "first":  # one export, the other actor read it
                assert said == ["exported", "read from the cache"], manifest["actor_devices"]
            else:
                assert said == expected, manifest["actor_devices"]
            assert len(files) == 1 and all(d["engine"] == "onnxruntime" for d in manifest["actor_devices"].values())
            rows = {r["doc"]: r["embedding"] for r in pq.read_table(tmp_path / run).to_pylist()}
            assert sorted(rows) == list(range(80)) and len(manifest["actors"]) == 2
            assert np.abs(np.array([rows[i] for i in range(80)]) - want).max() <= 1e-5
    finally:
        for cleanup in cleanups:
            cleanup()


def test_the_onnxruntime_engine_is_refused_where_it_does_not_apply(tmp_path, rayinfer_bert, cls_dense_query):
    """Before Ray starts: a task that runs on torch only, a dtype other than float32; in the
    actor, before any row: a stack whose transformer hands every layer's states on."""
    import json
    import shutil

    from rayinfer.api import plan_job
    from rayinfer.errors import ModelError

    pq.write_table(pa.table({"id": [1], "text": ["a b"]}), tmp_path / "in.parquet")

    def spec(task, model, **runtime):
        return {"task": task, "model": str(model), "input": {"path": str(tmp_path / "in.parquet"), "id_column": "id"},
                "output": {"path": str(tmp_path / "out")}, "runtime": {"engine": "onnxruntime", **runtime}}

    with pytest.raises(SpecError, match=r"^runtime.engine onnxruntime: task 'fill-mask' runs on torch only$"):
        plan_job(spec("fill-mask", rayinfer_bert))
    from click.testing import CliRunner

    from rayinfer.cli import main

    shown = {t: CliRunner().invoke(main, ["tasks", "show", t]).output.splitlines()[-1] for t in ("embed", "generate")}
    assert shown == {"embed": "engines (runtime.engine): torch, onnxruntime", "generate": "engines (runtime.engine): torch"}
    with pytest.raises(SpecError, match=r"^runtime.engine onnxruntime computes in float32 on CPUs: leave runtime.dtype"):
        plan_job(spec("embed", cls_dense_query, dtype="bfloat16"))
    plan_job(spec("embed", cls_dense_query))
    layers = shutil.copytree(cls_dense_query, tmp_path / "layers")
    config = json.loads((layers / "config.json").read_text())
    (layers / "config.json").write_text(json.dumps({**config, "output_hidden_states": True}))
    with pytest.raises(ModelError, match=r"^runtime.engine onnxruntime: the first module of .* \(Transformer\) is not "
                                         r"a text transformer whose last hidden states feed the rest; run it with "
                                         r"runtime.engine: torch$"):
        embed(layers, ["a b"], engine="onnxruntime")
