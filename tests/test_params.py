"""Every shipped params, recipe and preset file validates; bad ones name each bad key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.params import ParamsError, load_params, validate_file

from .conftest import REPO, write_params

SHIPPED = sorted(
    [REPO / "params.yaml", *REPO.glob("recipes/*.yaml"), *REPO.glob("presets/*.yaml")], key=lambda p: str(p)
)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_file_is_valid(path: Path):
    assert validate_file(path) == []


def test_llava_mod_recipe_is_the_default():
    mod = load_params(REPO / "params.yaml")
    assert mod.recipe == "llava-mod"
    assert mod.align.modules == ["projector"] and mod.align.loss.ce == 1 and mod.align.loss.kl_visual == 0
    assert mod.mimic_dense.loss.kl_response > 0
    assert set(mod.mimic_sparse.modules) == {"projector", "experts", "router", "shared_expert", "mlp"}
    assert mod.preference.loss.dpo > 0 and mod.preference.dpo.reference == "teacher"
    # The paper's choices, and tinymod's documented departures from them (recipes/llava-mod.yaml).
    assert mod.upcycle.layers == "every_other"  # range(L)[::2], as LLaVA-MoD
    assert mod.preference.dpo.loss_type == "sigmoid"  # the paper's DPO (its script: kto_pair)
    assert mod.mimic_sparse.splits == ["general", "multitask"]  # the paper: multitask only
    assert (mod.mimic_dense.loss.ce, mod.preference.dpo.sft_weight) == (1.0, 1.0)  # the paper: 0 and 0
    recipe = (REPO / "recipes" / "llava-mod.yaml").read_text()
    for paper_value in ("splits: [multitask]", "sft_weight: 0.0", "loss: {kl_response: 1.0}", "loss_type: kto_pair"):
        assert f"#   {paper_value}" in recipe or f": {paper_value}" in recipe, f"the recipe must name the paper's value: {paper_value}"


def test_llava_mod_stage_graph_upcycles_and_ends_with_preference():
    mod = load_params(REPO / "params.yaml")
    assert mod.stages == ["align", "mimic_dense", "upcycle", "mimic_sparse", "preference"]
    assert mod.pipeline == ("curate", "teacher", "teacher_cache", "align", "mimic_dense", "baseline", "upcycle", "mimic_sparse", "preference", "evaluate", "register")
    assert (mod.final_model, mod.registered_model) == ("pref", "pref")
    assert mod.evaluated_models == ["teacher", "baseline", "dense", "moe", "pref"]


def test_llava_kd_recipe_is_dpt_sft_dft_with_a_dense_student(tmp_path):
    kd = load_params(write_params(tmp_path, {"recipe": "llava-kd"}))
    assert kd.pipeline == ("curate", "teacher", "teacher_cache", "align", "mimic_dense", "baseline", "dft", "evaluate", "register")
    assert (kd.final_model, kd.registered_model) == ("dft", "dft")
    assert kd.evaluated_models == ["teacher", "baseline", "dense", "dft"]
    assert kd.align.modules == ["projector"]
    assert kd.align.loss.model_dump() == {"ce": 1.0, "kl_response": 1.0, "kl_visual": 1.0, "relation": 0.5, "dpo": 0.0, "router_aux": 0.0}
    assert kd.mimic_dense.loss.model_dump() == {"ce": 1.0, "kl_response": 0.0, "kl_visual": 0.0, "relation": 0.0, "dpo": 0.0, "router_aux": 0.0}
    assert kd.dft.modules == ["projector", "llm"]
    assert kd.dft.loss.model_dump() == {"ce": 1.0, "kl_response": 1.0, "kl_visual": 1.0, "relation": 0.5, "dpo": 0.0, "router_aux": 0.0}


def test_the_schedule_ablation_is_a_stages_override(tmp_path):
    sft = load_params(write_params(tmp_path, {"recipe": "llava-kd", "stages": ["align", "mimic_dense"]}))
    assert sft.pipeline[-4:] == ("mimic_dense", "baseline", "evaluate", "register") and sft.final_model == "dense"


@pytest.mark.parametrize(
    "overrides, key, message",
    [
        ({"stages": ["align", "mimic_sparse"]}, "stages[1]", "mimic_sparse starts from the student upcycle makes: list upcycle before it"),
        ({"stages": ["align", "mimic_dense", "upcycle"]}, "stages", "upcycle trains nothing"),
        ({"stages": ["mimic_dense"]}, "stages[0]", "must be align"),
        ({"stages": ["align", "mimic_dense", "mimic_dense"]}, "stages[2]", "listed twice"),
        ({"recipe": "llava-kd", "evaluate": {"models": ["teacher", "moe"]}}, "evaluate.models[1]", "no stage of this recipe makes 'moe'"),
        ({"recipe": "llava-kd", "register": {"model": "pref"}}, "register.model", "final is 'dft'"),
        ({"recipe": "llava-kd", "dft": {"modules": ["experts"]}}, "dft.modules", "exist only after upcycling"),
        ({"recipe": "llava-kd", "dft": {"loss": {"router_aux": 0.01}}}, "dft.loss.router_aux", "dense at this stage"),
    ],
)
def test_a_stage_graph_that_cannot_run_is_refused(tmp_path, overrides, key, message):
    with pytest.raises(ParamsError) as info:
        load_params(write_params(tmp_path, overrides))
    assert any(p.key == key and message in p.message for p in info.value.problems), info.value


def test_preset_overrides_params_file(tmp_path):
    ci = load_params(write_params(tmp_path, {"preset": "ci"}))
    assert ci.curate.world.images.general == 60
    assert ci.teacher.train.steps == 4
    assert ci.teacher.train.lr == load_params(REPO / "params.yaml").teacher.train.lr  # untouched keys stay


def test_every_problem_is_reported_with_its_dotted_key(tmp_path):
    path = write_params(
        tmp_path,
        {
            "teacher": {"source": "train", "train": {"lr": -1.0, "colour": "red"}},
            "upcycle": {"top_k": 8},
            "curate": {"world": {"image_size": 64, "shapes": ["circle", "blob", "square"]}},
        },
    )
    with pytest.raises(ParamsError) as info:
        load_params(path)
    keys = {p.key for p in info.value.problems}
    assert {"teacher.train.lr", "teacher.train.colour", "upcycle.top_k", "curate.world.shapes[1]", "teacher.vision.image_size"} <= keys
    colour = next(p for p in info.value.problems if p.key == "teacher.train.colour")
    assert "unknown key" in colour.message and "lr" in colour.message  # lists the allowed keys
    assert colour.origin == "params.yaml"


def test_a_stage_with_nothing_to_train_is_refused(tmp_path):
    with pytest.raises(ParamsError, match=r"align.modules: nothing to train"):
        load_params(write_params(tmp_path, {"align": {"modules": []}}))


def test_unknown_recipe_names_the_available_ones(tmp_path):
    with pytest.raises(ParamsError, match=r"llava-kd, llava-mod"):
        load_params(write_params(tmp_path, {"recipe": "nope"}))


def test_cli_exits_non_zero_and_names_keys(tmp_path):
    path = write_params(tmp_path, {"mimic_dense": {"steps": 0}})
    run = subprocess.run([sys.executable, "-m", "tasks.params", "validate", str(path)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 1
    assert "mimic_dense.steps" in run.stderr
    ok = subprocess.run([sys.executable, "-m", "tasks.params", "validate"], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr


def test_every_field_is_documented():
    from pydantic import BaseModel

    from tasks.params import Params

    seen: set[type] = set()

    def walk(model: type[BaseModel]) -> list[str]:
        missing = []
        seen.add(model)
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(f"{model.__name__}.{name}")
            annotation = field.annotation
            for candidate in getattr(annotation, "__args__", ()) + (annotation,):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel) and candidate not in seen:
                    missing += walk(candidate)
        return missing

    assert walk(Params) == []


def test_a_world_the_shipped_teacher_never_saw_fails_validation(tmp_path, monkeypatch):
    folder = tmp_path / "teachers" / "embedded"
    folder.mkdir(parents=True)
    world = load_params(REPO / "params.yaml").curate.world.model_dump(mode="json")
    (folder / "tinymod_trained_on.json").write_text(json.dumps({"curate.world": world}))
    monkeypatch.chdir(tmp_path)
    path = write_params(tmp_path, {"teacher": {"source": "teachers/embedded"}, "curate": {"world": {"hallucination_rate": 0.1}}})
    with pytest.raises(ParamsError) as info:
        load_params(path)
    problem = next(p for p in info.value.problems if p.key == "curate.world.hallucination_rate")
    assert "trained on 0.8" in problem.message and "teacher.source: train" in problem.message
    load_params(write_params(tmp_path, {"teacher": {"source": "teachers/embedded"}}))  # the world it saw passes


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 0\nmimic_dense:\n  steps: 10\n  lr: 0.001\n  steps: 20\n")
    with pytest.raises(ParamsError, match=r"key 'steps' is given twice \(lines 3 and 5\)"):
        load_params(path)


def test_an_unknown_preset_is_reported_with_every_other_problem(tmp_path):
    with pytest.raises(ParamsError) as info:
        load_params(write_params(tmp_path, {"preset": "nope", "recipe": "nada", "upcycle": {"top_k": 0}, "tracking": {"uri": "sqlite:/x.db"}}))
    keys = {p.key for p in info.value.problems}
    assert {"preset", "recipe", "upcycle.top_k", "tracking.uri"} <= keys


@pytest.mark.parametrize("uri", ["sqlite:/x.db", "sqlite://", "htp://localhost:5000", "http//localhost:5000", "http://", "mlflow.db"])
def test_a_malformed_tracking_uri_is_refused(tmp_path, uri):
    with pytest.raises(ParamsError, match=r"tracking.uri"):
        load_params(write_params(tmp_path, {"tracking": {"uri": uri}}))


def test_good_tracking_uris_pass(tmp_path):
    for uri in ("sqlite:///.mlflow/mlflow.db", "sqlite:////tmp/m.db", "http://127.0.0.1:5000", "https://mlflow.example.com/x", "postgresql+psycopg2://u@h/db", "databricks"):
        load_params(write_params(tmp_path, {"tracking": {"uri": uri}}))


def test_missing_source_files_are_named_before_any_work(tmp_path):
    sources = [{"kind": "world"}, {"kind": "llava_json", "path": str(tmp_path / "nope.json"), "image_root": str(tmp_path / "nowhere"), "split": "general"}]
    with pytest.raises(ParamsError) as info:
        load_params(write_params(tmp_path, {"curate": {"sources": sources}}))
    keys = {p.key for p in info.value.problems}
    assert {"curate.sources[1].path", "curate.sources[1].image_root"} <= keys


def test_zero3_over_several_ranks_is_refused_for_the_moe_stages(tmp_path):
    with pytest.raises(ParamsError) as info:
        load_params(write_params(tmp_path, {"mimic_sparse": {"zero_stage": 3, "world_size": 2}, "mimic_dense": {"zero_stage": 3, "world_size": 2}}))
    keys = {p.key for p in info.value.problems}
    assert "mimic_sparse.zero_stage" in keys and "mimic_dense.zero_stage" not in keys


def test_a_shared_expert_no_stage_trains_is_refused(tmp_path):
    modules = ["projector", "experts", "router", "mlp"]
    with pytest.raises(ParamsError, match=r"upcycle.shared_expert: no stage after upcycling trains the shared expert"):
        load_params(write_params(tmp_path, {"upcycle": {"shared_expert": True}, "mimic_sparse": {"modules": modules}, "preference": {"modules": modules}}))
    load_params(write_params(tmp_path, {"upcycle": {"shared_expert": True}}))  # the recipe trains it


def test_a_cached_teacher_where_no_cache_can_serve_is_refused(tmp_path):
    overrides = {
        "preference": {"teacher": {"mode": "cached"}},
        "mimic_dense": {"teacher": {"mode": "cached", "top_k": 64}, "distill_all_tokens": True},
        "teacher_cache": {"top_k": 32},
    }
    with pytest.raises(ParamsError) as info:
        load_params(write_params(tmp_path, overrides))
    text = str(info.value)
    assert "preference.teacher.mode: preference scores its reference once per pair already" in text
    assert "mimic_dense.teacher.mode: the cache holds response and image positions only" in text
    assert "mimic_dense.teacher.top_k: must be <= teacher_cache.top_k (32)" in text


def test_the_committed_dvc_yaml_is_what_params_render():
    from tasks.stages import out_of_date

    assert out_of_date(load_params(REPO / "params.yaml"), REPO) is None, "run `python -m tasks.stages` and commit dvc.yaml"


def test_rendered_stages_follow_the_recipe_and_list_their_code(tmp_path):
    import yaml

    from tasks.stages import dump, render

    kd = render(load_params(write_params(tmp_path, {"recipe": "llava-kd"})))["stages"]
    assert list(kd) == ["curate", "teacher", "teacher_cache", "align", "mimic_dense", "baseline", "dft", "evaluate", "register"]
    assert "${paths.models}/student_dense" in kd["dft"]["deps"] and "${paths.models}/student_dft" in kd["dft"]["outs"]
    assert "${paths.models}/student_dft" in kd["register"]["deps"] and "${paths.models}/student_moe" not in kd["evaluate"]["deps"]
    # Imports are followed through lazy imports and the job launcher's module name.
    assert {"tasks/training.py", "model/engine.py", "model/losses.py", "model/teacher_cache.py"} <= set(kd["dft"]["deps"])
    assert "model/engine.py" not in kd["curate"]["deps"]
    assert "dft" in kd["teacher_cache"]["params"]
    assert yaml.safe_load(dump({"stages": kd})) == {"stages": kd}


def test_a_stage_refuses_a_dvc_yaml_rendered_for_another_recipe(tmp_path):
    import shutil

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")  # llava-mod's
    path = write_params(tmp_path, {"recipe": "llava-kd"})
    out = subprocess.run([sys.executable, "-m", "tasks.curate", "--params", str(path)], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 1
    assert "dvc.yaml is out of date" in out.stderr and "recipe llava-kd runs" in out.stderr and "python -m tasks.stages" in out.stderr
    out = subprocess.run([sys.executable, "-m", "tasks.upcycle", "--params", str(path)], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 1 and "recipe llava-kd has no stage upcycle" in out.stderr, out.stderr


def test_a_training_stage_hands_its_job_one_typed_spec():
    """What the DeepSpeed job reads is model/config.py's JobSpec, built from the params alone and read back as written."""
    from pydantic import ValidationError

    from model.config import JobSpec
    from tasks.common import StagePaths
    from tasks.training import Job, job_spec, stage_files

    params = load_params(REPO / "params.yaml")
    paths = StagePaths(params, REPO)
    dense = params.mimic_dense
    job = Job("mimic_dense", dense, init=paths.student("align"), out=paths.student("dense"), data_files=stage_files(paths, dense.splits), teacher=paths.teacher)
    spec = job_spec(params, paths, job)
    assert spec == job_spec(params, paths, job), "a pure function of the params and the job"
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec
    assert spec.train.loss == dense.loss and spec.teacher_cache.top_k == dense.teacher.top_k and spec.reference is None
    assert spec.out.endswith("student_dense.staging"), "the job writes beside the stage's output"
    pref = params.preference
    spec = job_spec(params, paths, Job("preference", pref, init=paths.student("moe"), out=paths.student("pref"), data_files=stage_files(paths, pref.splits), teacher=paths.teacher, dpo=pref.dpo))
    assert spec.reference == "teacher" and spec.data.preference and spec.teacher_cache is None
    assert spec.dpo == pref.dpo and "dpo" not in spec.train.model_dump(), "DPO lives in one place"
    bad = json.loads(spec.model_dump_json())
    bad["train"]["stepz"] = 3
    with pytest.raises(ValidationError, match="stepz"):
        JobSpec.model_validate(bad)


def test_a_per_split_fraction_must_name_exactly_the_stages_splits(tmp_path):
    with pytest.raises(ParamsError) as info:
        load_params(write_params(tmp_path, {"mimic_dense": {"fraction": {"general": 0.5, "multitask": 0.1, "lookup": 0.2}}}))
    problem = next(p for p in info.value.problems if p.key == "mimic_dense.fraction")
    assert "['general', 'lookup', 'multitask']" in problem.message and "one share per split" in problem.message
    with pytest.raises(ParamsError) as info:
        load_params(write_params(tmp_path, {"mimic_dense": {"fraction": {"general": 1.5, "multitask": 0.1}}}))
    assert [p.key for p in info.value.problems] == ["mimic_dense.fraction.general"]  # one problem, not one per form of the union


def test_a_per_split_fraction_subsamples_each_split_on_its_own(tmp_path):
    from model.data import stage_records

    files = []
    for split, n in [("general", 40), ("multitask", 160)]:
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"id": f"{split}-{i}"}) + "\n" for i in range(n)))
        files.append(str(path))
    records = stage_records(files, {"general": 0.5, "multitask": 0.1}, seed=0)
    kinds = [r["id"].split("-")[0] for r in records]
    assert kinds.count("general") == 20 and kinds.count("multitask") == 16
    assert records == stage_records(files, {"general": 0.5, "multitask": 0.1}, seed=0)  # the teacher cache reads the same records
    assert len(stage_records(files, 0.1, seed=0)) == 20  # one number: a share of all the records together


def test_a_student_shape_the_pretrained_llm_does_not_have_is_refused(tmp_path):
    with pytest.raises(ParamsError) as info:
        load_params(write_params(tmp_path, {"align": {"student": {"text": {"hidden_size": 256, "layers": 4}}}}))
    problems = {p.key: p.message for p in info.value.problems}
    assert set(problems) == {"align.student.text.hidden_size", "align.student.text.layers"}
    assert "is 256, but align.student.llm students/embedded has 128" in problems["align.student.text.hidden_size"]
    # The shipped file's values describe students/embedded (test_shipped_file_is_valid); without `text`
    # nothing is claimed; a fresh LLM takes any shape.
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    del params["align"]["student"]["text"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    load_params(tmp_path / "params.yaml")
    load_params(write_params(tmp_path, {"align": {"student": {"llm": "init", "sha256": None, "text": {"hidden_size": 256, "layers": 4}}}}))


def test_a_student_llm_whose_config_is_not_json_is_named(tmp_path):
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text("{not json")
    with pytest.raises(ParamsError, match=r"align.student.llm: .*llm/config.json is not valid JSON"):
        load_params(write_params(tmp_path, {"align": {"student": {"llm": str(tmp_path / "llm"), "sha256": None}}}))


def test_upcycling_a_layer_the_pretrained_llm_lacks_is_refused(tmp_path):
    with pytest.raises(ParamsError, match=r"upcycle.layers\[1\]: layer 2 does not exist: the student has 2 layers"):
        load_params(write_params(tmp_path, {"upcycle": {"layers": [0, 2]}}))
