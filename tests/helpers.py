from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rayinfer.testing import english_sentences, write_dataset


def masked_corpus(n: int) -> dict[str, list[Any]]:
    """n rows of real sentences with one word masked, ids 1000.. and a passthrough column."""
    sents = english_sentences()
    texts = []
    for i in range(n):
        words = sents[i % len(sents)].split()
        words[len(words) // 2] = "[MASK]"
        texts.append(" ".join(words))
    return {"doc_id": list(range(1000, 1000 + n)), "sentence": texts, "source": [f"topic-{i % 7}" for i in range(n)]}


def write_job(path: Path, **spec: Any) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def fill_mask_job(
    tmp: Path, model: Path, rows: int = 50, files: int = 2, corpus: dict[str, list[Any]] | None = None,
    row_group_size: int | None = None, **extra: Any,
) -> Path:
    write_dataset(tmp / "in", corpus or masked_corpus(rows), files=files, row_group_size=row_group_size)
    spec = {
        "task": "fill-mask",
        "model": str(model),
        "input": {"path": str(tmp / "in"), "id_column": "doc_id", "columns": {"text": "sentence"}, "keep": ["source"]},
        "output": {"path": str(tmp / "out")},
        "options": {"top_k": 3},
        # one actor: a second on the 2-CPU embedded Ray costs a process importing torch per job
        # (test_e2e's many-files job runs the default pool)
        "runtime": {"batch_size": 32, "num_cpus": 1, "actors": 1},
    }
    for key, value in extra.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return write_job(tmp / "job.yaml", **spec)


def write_units(location: str, files: list, coverage: dict, batch: int, unit_rows: int,
                stop_after: int | None = None, part_bytes: int = 1, shuffle_seed: int | None = None) -> int:
    """The actors' read -> write -> commit path without Ray or a model: each unit's ids are read
    in batches of ``batch`` and written as parts (with the default ``part_bytes`` of 1, a part per
    batch). With ``stop_after``, stops like a crash once that many parts are committed: the open
    part's temporary file is left behind. Returns the number of parts committed."""
    import random

    import pyarrow as pa

    from rayinfer.io.folder import unit_todo
    from rayinfer.io.parts import PartWriter
    from rayinfer.io.rows import read_rows
    from rayinfer.io.store import Store
    from rayinfer.plan.work import make_units

    store = Store(location)
    schema = pa.schema([pa.field("id", pa.int64())])
    units = make_units(files, coverage, unit_rows)
    by_path = {f.path: f for f in files}
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(units)  # Ray gives no order
    committed = 0
    for unit in units:
        unit = unit_todo(store, unit)
        writer = PartWriter(store, schema, {"run": "test"}, part_bytes, row_group_rows=batch)
        for piece in unit["pieces"]:
            for table, rows, _ in read_rows(by_path[piece["file"]], piece["ranges"], ["id"], batch):
                if stop_after is not None and committed >= stop_after:  # a part half-written when the process dies
                    PartWriter(store, schema, {"run": "test"}, 1 << 40, row_group_rows=1).write(piece["file"], table, rows)
                    return committed
                committed += len(writer.write(piece["file"], table, rows, piece["fingerprint"]))
        committed += len(writer.close())
    return committed


FORMAT_CASES = ["parquet", "arrow-file", "arrow-stream", "hf-dataset", "jsonl", "csv", "c4-json.gz", "jsonl.zst"]
"""c4-json.gz: two gzipped JSON Lines files named as C4 ships them (``.json.gz``); jsonl.zst: one
zstd-compressed JSON Lines file, as The Pile and Dolma ship them."""


def write_as(fmt: str, table: Any, folder: Path, chunk_rows: int, name: str = "data") -> Path:
    """``table`` as an input of ``fmt`` (a FORMAT_CASES name) in ``folder``, in chunks of
    ``chunk_rows`` where the format has chunks; returns the file (or, for hf-dataset, the folder)
    to give as input.path."""
    import json

    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        path = folder / f"{name}.parquet"
        pq.write_table(table, path, row_group_size=chunk_rows)
    elif fmt in ("arrow-file", "arrow-stream"):
        path = folder / f"{name}.arrow"
        new = pa.ipc.new_file if fmt == "arrow-file" else pa.ipc.new_stream
        with new(path, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=chunk_rows):
                writer.write_batch(batch)
    elif fmt == "hf-dataset":
        import datasets

        path = folder / name
        datasets.Dataset.from_dict(table.to_pydict()).save_to_disk(str(path), num_shards=2)
    elif fmt == "jsonl":
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in table.to_pylist()), encoding="utf-8")
    elif fmt == "c4-json.gz":
        import gzip

        half = (table.num_rows + 1) // 2
        for i, part in enumerate([table.slice(0, half), table.slice(half)]):
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part.to_pylist())
            (folder / f"{name}.{i:05d}-of-00002.json.gz").write_bytes(gzip.compress(lines.encode("utf-8")))
        path = folder / f"{name}.*-of-00002.json.gz"
    elif fmt == "jsonl.zst":
        path = folder / f"{name}.jsonl.zst"
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in table.to_pylist())
        with pa.output_stream(str(path), compression="zstd") as f:
            f.write(lines.encode("utf-8"))
    elif fmt == "csv":
        path = folder / f"{name}.csv"
        pacsv.write_csv(table, path)
    else:
        raise ValueError(fmt)
    return path


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this test session: the OS may give a port it
    just gave again once that is closed (two agents of one `ray start` node once got the same one,
    and the node refused to start)."""
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def agent_ports() -> list[str]:
    """`ray start` flags putting a node's agents on ports of their own: the defaults (52365, ...)
    may be held by another Ray on this machine (the tests' embedded Ray), and a head whose job
    agent cannot bind takes no job ("No available agent to submit job")."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


def kill_cluster(temp: str) -> None:
    """Every process of a test cluster (their command lines name its temp dir), and their children."""
    import signal

    import psutil

    victims = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if temp in " ".join(p.info["cmdline"] or []):
                victims += [p, *p.children(recursive=True)]
        except psutil.Error:
            continue
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=10)


def cluster_env() -> dict[str, str]:
    """The environment of a test `ray start` cluster and of the clients that talk to it: this
    venv's `python` and `ray` first on PATH, token authentication with a fresh token, offline."""
    import os
    import secrets
    import sys

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    return env


def assert_fill_mask_output(out_dir: Path, corpus: dict[str, list[Any]], model: Path, top_k: int = 3,
                            id_column: str = "doc_id") -> None:
    """Every input row is in ``out_dir`` once, and each row's outputs equal the fill-mask task run on
    its text directly, without Ray: what a resumed run must give, the rows redone as much as the
    rows committed before the interruption."""
    import pyarrow.parquet as pq
    from rayinfer_tasks.fill_mask import FillMaskTask

    from rayinfer.testing import run_task

    table = pq.read_table(out_dir)
    rows = {r[id_column]: r for r in table.to_pylist()}
    assert table.num_rows == len(corpus[id_column]) and sorted(rows) == sorted(corpus[id_column])
    direct = run_task(FillMaskTask, [{"text": t} for t in corpus["sentence"]], model, {"top_k": top_k})
    for doc_id, want in zip(corpus[id_column], direct):
        got = rows[doc_id]
        # (a job's error text also names the dataset column: "input 'text' (column 'sentence') is null")
        assert (got["error"] is None) == (want["error"] is None) and got["filled"] == want["filled"], doc_id
        assert ([[c["token_id"] for c in m] for m in got["predictions"] or []]
                == [[c["token_id"] for c in m] for m in want["predictions"] or []]), doc_id


def generate_alone(model: Any, tok: Any, prompt: str, max_new_tokens: int, **generate_kwargs: Any) -> tuple[str, int]:
    """What ``model.generate`` gives one prompt alone, greedy: (the new text up to end-of-sequence,
    its token count), the reference the decode paths are held to."""
    import torch

    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.inference_mode():
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=tok.eos_token_id,
                             **generate_kwargs)[0, ids.shape[1]:].tolist()
    n = next((j for j, t in enumerate(new) if t == tok.eos_token_id), len(new))
    return tok.decode(new[:n], skip_special_tokens=True), n


CUSTOM_CONFIG = '''from transformers import BertConfig


class TinyCustomConfig(BertConfig):
    model_type = "rayinfer-tiny-custom"
'''

CUSTOM_MODELING = '''import os

from transformers import BertForMaskedLM

from .configuration_tiny import TinyCustomConfig


class TinyCustomForMaskedLM(BertForMaskedLM):
    """BERT's masked LM under a model type transformers does not have; each process that builds it
    leaves a file named after its pid in {marks!r}."""

    config_class = TinyCustomConfig

    def __init__(self, config):
        super().__init__(config)
        open(os.path.join({marks!r}, f"built-in-{{os.getpid()}}"), "w").close()
'''


def custom_code_model(folder: Path, base: Path, marks: Path) -> Path:
    """A model folder with its own code, as chat models with `trust_remote_code` ship: ``base``'s
    BERT masked-LM weights and tokenizer under a model_type transformers does not have, its
    config.json's auto_map naming configuration_tiny.py and modeling_tiny.py beside it. Each
    process that builds the model leaves a mark in ``marks``."""
    import json
    import shutil

    shutil.copytree(base, folder)
    marks.mkdir(parents=True, exist_ok=True)
    (folder / "configuration_tiny.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_tiny.py").write_text(CUSTOM_MODELING.format(marks=str(marks)))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="rayinfer-tiny-custom", architectures=["TinyCustomForMaskedLM"],
                  auto_map={"AutoConfig": "configuration_tiny.TinyCustomConfig",
                            "AutoModelForMaskedLM": "modeling_tiny.TinyCustomForMaskedLM"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
