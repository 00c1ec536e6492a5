"""Models with their own code (config.json's auto_map, as chat models needing trust_remote_code
ship): refused before Ray starts unless the spec trusts them, naming the code that would run; with
trust_remote_code: true, every actor runs that code, and the outputs equal the same weights under
transformers' own class. (The same model on the two-node cluster: test_cluster.py.)"""

from __future__ import annotations

import os

from click.testing import CliRunner
from helpers import assert_fill_mask_output, custom_code_model, fill_mask_job, masked_corpus

from rayinfer.api import run_job
from rayinfer.cli import main
from rayinfer.models.locate import remote_code_files


def test_a_model_with_its_own_code_is_refused_without_trust_and_runs_in_the_actors_with_it(
        tmp_path, rayinfer_bert, ray_session):
    marks = tmp_path / "marks"
    model = custom_code_model(tmp_path / "custom", rayinfer_bert, marks)
    job = fill_mask_job(tmp_path, model, rows=40)
    refused = CliRunner().invoke(main, ["run", str(job)])
    assert refused.exit_code == 2
    assert refused.output.splitlines() == [
        f"rayinfer: error: model '{model}' (model_type 'rayinfer-tiny-custom', not one transformers has) runs its own "
        f"code: config.json's auto_map names configuration_tiny.py, modeling_tiny.py in {model}, which would run in "
        "every actor. Read it; to run it, set trust_remote_code: true in the job spec"]
    assert not (tmp_path / "out").exists() and not list(marks.iterdir())  # refused before anything ran

    manifest = run_job(job, ["trust_remote_code=true"])
    assert manifest["rows"] == 40 and manifest["errors"] == 0
    built = {int(m.name.rsplit("-", 1)[1]) for m in marks.iterdir()}
    assert built and os.getpid() not in built  # the model's own class, built in the actors
    # the same weights under transformers' BertForMaskedLM, run directly: the same outputs
    assert_fill_mask_output(tmp_path / "out", masked_corpus(40), rayinfer_bert)


def test_the_code_files_an_auto_map_names():
    config = {"auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModel": "modeling_x.XModel",
                           "AutoModelForCausalLM": "modeling_x.XForCausalLM",
                           "AutoTokenizer": ["tokenization_x.XTokenizer", None],
                           "AutoModelForMaskedLM": "org/other--modeling_y.YForMaskedLM"}}
    assert remote_code_files(config) == ["configuration_x.py", "modeling_x.py", "tokenization_x.py",
                                         "org/other: modeling_y.py"]
    assert remote_code_files({"model_type": "llama"}) == []


def test_a_model_transformers_has_runs_its_own_code_whatever_its_auto_map(tmp_path, rayinfer_bert):
    """Many hub checkpoints of architectures transformers has still carry an auto_map: validate
    takes them without trust_remote_code (transformers runs its own class for them)."""
    import json
    import shutil

    folder = tmp_path / "bert-with-auto-map"
    shutil.copytree(rayinfer_bert, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_bert.BertModel"}}))
    shown = CliRunner().invoke(main, ["validate", str(fill_mask_job(tmp_path, folder))])
    assert shown.exit_code == 0, shown.output
