"""Every knob of the pipeline, validated before any work starts.

``params.yaml`` has one section per stage plus shared settings. The values a
stage sees are resolved in layers, later layers winning:

1. the defaults written below,
2. the recipe named by ``recipe`` (``recipes/<recipe>.yaml``: its student
   stages, which modules train and the loss weights of each training stage),
3. ``params.yaml`` itself,
4. the preset named by ``preset`` (``presets/<preset>.yaml``: a scale
   override, e.g. ``ci`` shrinks the embedded default to run in CI).

Validation reports every problem at once, each naming its dotted key, the file
that set it and what is allowed::

    python -m tasks.params validate [FILE]
    python -m tasks.params show [FILE]        # the resolved values
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from model.config import (  # the sections model/ reads, defined once there and re-exported
    SHAPES_DRAWN,
    SHARES_TAGS,
    TEACHER_TERMS,
    TEXT_CONFIG_NAMES,
    DPOParams,
    LossWeights,
    Section,
    TeacherUse,
    TextParams,
    TrainingParams,
    UpcycleParams,
    VisionParams,
    WorldParams,
)
from model.errors import TinymodError

REPO = Path(__file__).resolve().parent.parent
# Written beside a trained teacher's weights: the world and recipe it learned from.
TRAINED_ON = "tinymod_trained_on.json"


@dataclass(frozen=True)
class StudentStage:
    """What a student stage is: the checkpoint it writes, the one it starts from, whether its student is an MoE,
    whether it trains, and whether on preference pairs (whose DPO reference is scored once per pair, never cached)."""

    makes: str
    reads: str | None
    moe: bool
    trains: bool = True
    pairs: bool = False


# Every stage that makes a student. A recipe's `stages` is a chain of these (see Params.pipeline);
# `baseline` runs in every recipe, after mimic_dense, with mimic_dense's settings and no teacher.
STUDENT_STAGES = {
    "align": StudentStage(makes="align", reads=None, moe=False),
    "mimic_dense": StudentStage(makes="dense", reads="align", moe=False),
    "baseline": StudentStage(makes="baseline", reads="align", moe=False),
    "upcycle": StudentStage(makes="upcycled", reads="dense", moe=True, trains=False),
    "mimic_sparse": StudentStage(makes="moe", reads="upcycled", moe=True),
    "preference": StudentStage(makes="pref", reads="moe", moe=True, pairs=True),
    "dft": StudentStage(makes="dft", reads="dense", moe=False),
}
# Checkpoint folder under paths.models of every model key.
CHECKPOINTS = {"teacher": "teacher"} | {stage.makes: f"student_{stage.makes}" for stage in STUDENT_STAGES.values()}
TRAINING_STAGES = tuple(name for name, stage in STUDENT_STAGES.items() if stage.trains and name != "baseline")
RecipeStage = Literal["align", "mimic_dense", "upcycle", "mimic_sparse", "preference", "dft"]
ModelName = Literal["teacher", "align", "baseline", "dense", "moe", "pref", "dft"]


# ---------------------------------------------------------------- shared


class Paths(Section):
    data: str = "data"
    """Root of generated and curated data (data/world, data/curated)."""
    models: str = "models"
    """Root of checkpoints: tokenizer, teacher, student_<model> (align, dense, baseline, upcycled, moe, pref, dft)."""
    metrics: str = "metrics"
    """One JSON per stage, read by `dvc metrics show`."""
    reports: str = "reports"
    """Data card, evaluation and review reports, and plots."""
    runs: str = ".cache/runs"
    """Resumable training state (DeepSpeed checkpoints). Git- and DVC-ignored; kept across crashes."""


TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


class Tracking(Section):
    uri: str = "sqlite:///.mlflow/mlflow.db"
    """MLflow tracking and registry URI: a local SQLite file (default) or a server, e.g. http://127.0.0.1:5000."""

    @field_validator("uri")
    @classmethod
    def _a_uri_mlflow_can_open(cls, uri: str) -> str:
        if uri == "databricks":
            return uri
        scheme, sep, rest = uri.partition(":")
        scheme = scheme.split("+")[0]  # postgresql+psycopg2://...
        if not sep or scheme not in TRACKING_SCHEMES:
            raise ValueError(f"{uri!r} is not an MLflow URI: use sqlite:///path.db, http(s)://host:port, file:/path or a database URL ({', '.join(TRACKING_SCHEMES)})")
        if scheme == "sqlite" and not (rest.startswith("///") and len(rest) > 3):
            raise ValueError(f"{uri!r}: a SQLite URI is sqlite:///relative/path.db or sqlite:////absolute/path.db")
        if scheme in ("http", "https") and not re.match(r"^//[^/\s:]+(:\d+)?(/\S*)?$", rest):
            raise ValueError(f"{uri!r}: a server URI is {scheme}://host[:port][/path]")
        return uri
    artifact_location: str = ".mlflow/artifacts"
    """Where runs of a new experiment store artifacts: a local folder (relative to the repo) or s3://bucket/prefix."""
    experiment: str = "tinymod"
    """MLflow experiment that holds every stage's run."""
    system_metrics: bool = True
    """Log CPU/memory (and GPU where present) of training runs as MLflow system metrics."""


# ---------------------------------------------------------------- curate


class WorldSource(Section):
    kind: Literal["world"] = "world"
    """Generate the embedded world (into data/world/) and curate it."""


class LlavaJsonSource(Section):
    kind: Literal["llava_json"]
    """LLaVA conversation JSON or JSONL (LLaVA-Pretrain, LLaVA-mix-665K layout)."""
    path: str
    """The .json (a list of records) or .jsonl file."""
    image_root: str
    """Folder the records' `image` paths are relative to; no image may resolve outside it."""
    split: Literal["general", "multitask"]
    """Which curated split the records join."""


class PreferenceSource(Section):
    kind: Literal["preference"]
    """RLAIF-V-style preference pairs: columns image, question, chosen, rejected."""
    path: str
    """A .parquet or .jsonl file."""
    image_root: str
    """Folder the `image` paths are relative to (parquet may instead embed image bytes)."""


Source = Annotated[WorldSource | LlavaJsonSource | PreferenceSource, Field(discriminator="kind")]


class TokenizerParams(Section):
    source: str = "teachers/embedded"
    """`world` trains a byte-level BPE tokenizer on the world's text; otherwise a local folder with a HF tokenizer (the teacher's)."""
    vocab_size: int = Field(512, ge=300, le=300_000)
    """Vocabulary size when training on the world."""


class CurateParams(Section):
    sources: list[Source] = Field(default_factory=lambda: [WorldSource()], min_length=1)
    """Where records come from; each adapter's records are validated the same way."""
    world: WorldParams = WorldParams()
    """The embedded world, used when `sources` has `kind: world`."""
    tokenizer: TokenizerParams = TokenizerParams()
    """The tokenizer used to check token lengths, saved to models/tokenizer/."""
    max_tokens: int = Field(512, ge=16)
    """Longest allowed conversation in tokens, image tokens included."""
    image_tokens: int = Field(9, ge=1)
    """Tokens one image takes in the LLM input ((image_size / patch_size)^2 for LLaVA)."""
    min_image_side: int = Field(16, ge=1)
    """Images smaller than this on either side are rejected."""
    max_image_side: int = Field(4096, ge=16)
    """Images larger than this on either side are rejected."""
    max_rejected_fraction: float = Field(0.05, ge=0.0, le=1.0)
    """The stage fails when more than this fraction of input records is rejected (everything is still written)."""


# ---------------------------------------------------------------- models


class VisionPretrainParams(Section):
    steps: int = Field(500, ge=0)
    """Steps of text-aligned per-cell pretraining of the embedded teacher's vision tower and projector on the world's ground truth
    (0, or no world among curate.sources: the tower starts from scratch)."""
    lr: float = Field(2e-3, gt=0.0, le=1.0)
    """AdamW learning rate of the pretraining."""
    batch_size: int = Field(64, ge=1)
    """Images per pretraining step."""


class TeacherParams(Section):
    seed: int = 0
    """Seed of the embedded teacher's initialisation and data order; apart from the global seed, so student runs over seeds share one teacher."""
    source: str = "teachers/embedded"
    """`train` trains the embedded teacher on the world; otherwise a local folder or s3:// URI of a LLaVA-format HF checkpoint.

    The default is the embedded teacher this project trained with `train` and ships (see README, "The teacher")."""
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    """SHA-256 of the imported checkpoint's weights (its *.safetensors files in name order); the import refuses others."""
    vision: VisionParams = VisionParams()
    """Vision tower of the trained teacher (shared, frozen, with every student)."""
    text: TextParams = TextParams()
    """LLM of the trained teacher."""
    vision_pretrain: VisionPretrainParams = VisionPretrainParams()
    """Before LLaVA training, pretrain the vision tower to name each grid cell's object (as a real teacher starts from CLIP)."""
    train: TrainingParams = TrainingParams(
        splits=["general", "multitask"], modules=["projector", "llm"], loss=LossWeights(ce=1.0), steps=2000, lr=1e-3, warmup_steps=50,
        checkpoint_every=200, log_every=20,
    )
    """How the embedded teacher trains (ce only, projector and LLM: the tower stays frozen, as LLaVA keeps CLIP frozen)."""
    lookup: TrainingParams | None = TrainingParams(
        splits=["general", "multitask", "lookup"], modules=["projector", "llm"], loss=LossWeights(ce=1.0), steps=1000, lr=3e-4, warmup_steps=20,
        checkpoint_every=200, log_every=20,
    )
    """A second phase, started from the first's weights: its data plus the lookup split, about half each.

    After the first phase the teacher finds the object a colour question names but not the one a
    place question names (position 0.64 on the probes, 0.73 on fresh scenes); twice the steps on
    the same data did not move it, nor did more place questions in the world's own records, trained
    from scratch (0.69 and 0.54 over two seeds). Continued on records that ask for the lookup,
    the place lookup forms (0.80 over three draws). null: one phase."""


class StudentParams(Section):
    llm: str = "init"
    """`init` builds a fresh LLM from `text`; otherwise a local folder with a HF causal LM sharing the teacher's vocabulary.

    The embedded default's is students/embedded, this project's stand-in for a pretrained small LLM
    (made by bench/student_llm.py; README, "The students")."""
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    """SHA-256 of the pretrained LLM's weights (its *.safetensors files in name order); align refuses others. null with `llm: init`."""
    text: TextParams = TextParams(hidden_size=128, intermediate_size=384, layers=2, heads=4, kv_heads=2)
    """LLM of the student when `llm: init`. A pretrained LLM keeps its own shape: a key written here must match its config.json."""


class WordAlignParams(Section):
    steps: int = Field(300, ge=0)
    """Steps of scoring the student's projected image cells against its own word embeddings before align trains
    (model/vision_pretrain.py, tower frozen). Runs with the world among curate.sources, for a fresh LLM and a
    pretrained one alike: the image tokens are new either way (real data has no per-cell truth to score)."""
    lr: float = Field(2e-3, gt=0.0, le=1.0)
    """AdamW learning rate of the word alignment."""
    batch_size: int = Field(64, ge=1)
    """Images per word-alignment step."""


class AlignParams(TrainingParams):
    student: StudentParams = StudentParams()
    """The student this stage builds: the teacher's frozen vision tower, a new projector and this LLM."""
    word_align: WordAlignParams = WordAlignParams()
    """Put a fresh student's image tokens where its words are, as the teacher's vision pretraining did for the teacher."""


class PreferenceParams(TrainingParams):
    dpo: DPOParams = DPOParams()
    """The preference loss."""


class EvaluateParams(Section):
    tasks: list[str] = Field(
        default_factory=lambda: [
            "tinymod_pope_random",
            "tinymod_pope_popular",
            "tinymod_pope_adversarial",
            "tinymod_vqa",
            "tinymod_caption",
        ]
    )
    """lmms-eval task names: the embedded probes (tinymod_*) or any lmms-eval task (pope, mme, gqa, ...) whose data is reachable."""
    models: list[ModelName] | None = None
    """Checkpoints to score; None: the teacher, the baseline and every trained student the recipe's stages make (`align` too on request: the aligned student, before it learns to answer)."""
    local_data: dict[str, str] = Field(default_factory=dict)
    """Local copies of stock lmms-eval tasks' datasets, task -> folder (e.g. {pope: /data/POPE}): the hub's files
    (parquet under the task's split name, as `datasets.load_dataset` reads them) stand in for its `dataset_path`."""
    batch_size: int = Field(32, ge=1)
    """Requests per generate call."""
    limit: int | None = Field(None, ge=1)
    """Score at most this many documents per task (None: all)."""
    max_new_tokens: int = Field(48, ge=1)
    """Generation budget for captions and answers."""


class GateParams(Section):
    """Every bound is relative to the teacher: the papers claim a student that trails its teacher a little
    on understanding and hallucinates no more than it."""

    understanding_delta: float = Field(0.1, ge=0.0, le=1.0)
    """Champion needs VQA accuracy and caption object recall >= the teacher's minus this (recall: CHAIR alone rewards captions that name nothing)."""
    hallucination_margin: float = Field(0.0, ge=0.0, le=1.0)
    """Champion needs POPE adversarial F1 >= the teacher's minus this, and CHAIR-i and partner hallucination <= the teacher's plus this."""


class RegisterParams(Section):
    model_name: str = Field("tinymod-student", min_length=1)
    """Registered model in the MLflow registry."""
    model: Literal["final", "dense", "moe", "pref", "dft"] = "final"
    """Which student becomes the new version; final: the one the recipe's last stage makes."""
    gate: GateParams = GateParams()
    """Checks that move the `champion` alias to the new version."""
    promote: bool = True
    """Move `champion` to a version that passes the gate; false records the verdict only."""
    require_approval: bool = False
    """In the Prefect flow, pause for a reviewer before moving `champion` (outside the flow: `python -m tasks.register promote`)."""
    approval_timeout_s: int = Field(86400, ge=60)
    """How long the paused flow waits for the reviewer before the run fails (the version stays candidate)."""


# `register` is also ABCMeta.register on the class; the field still wins on instances.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class TeacherCacheParams(Section):
    top_k: int = Field(32, ge=1)
    """Teacher tokens stored per position; every cached stage reads its own teacher.top_k <= this."""
    batch_size: int = Field(64, ge=1)
    """Records per teacher forward pass."""


class Params(Section):
    seed: int = 0
    """Seed of every stage's sampling and initialisation."""
    preset: str = "embedded"
    """Scale preset applied over this file: presets/<preset>.yaml (embedded: as written; ci: small and fast)."""
    recipe: str = "llava-mod"
    """Distillation recipe: recipes/<recipe>.yaml sets its stages and each training stage's modules and loss weights."""
    stages: list[RecipeStage] = Field(default_factory=lambda: ["align", "mimic_dense", "upcycle", "mimic_sparse", "preference"], min_length=1)
    """The student stages the pipeline runs, in order (set by the recipe; `python -m tasks.stages` renders dvc.yaml from them)."""
    paths: Paths = Paths()
    """Where stages write (DESIGN.md's contract)."""
    tracking: Tracking = Tracking()
    """MLflow tracking and registry."""
    curate: CurateParams = CurateParams()
    """Stage curate: sources, the embedded world, the tokenizer and record checks."""
    teacher: TeacherParams = TeacherParams()
    """Stage teacher: train the embedded teacher or import a real one."""
    teacher_cache: TeacherCacheParams = TeacherCacheParams()
    """Stage teacher_cache: the teacher's top-k outputs over the records of every stage with teacher.mode cached."""
    align: AlignParams = AlignParams(splits=["general"], fraction=0.06, steps=150)
    """Stage align: build the student and align its projector (LLaVA-KD's DPT with distillation terms on)."""
    mimic_dense: TrainingParams = TrainingParams(splits=["general", "multitask"], fraction=0.1, steps=500, teacher=TeacherUse(mode="cached"))
    """Stage mimic_dense: dense-to-dense mimic distillation."""
    upcycle: UpcycleParams = UpcycleParams()
    """Stage upcycle: the dense student becomes a sparse Mixture-of-Experts."""
    mimic_sparse: TrainingParams = TrainingParams(splits=["general", "multitask"], fraction=0.1, steps=250, teacher=TeacherUse(mode="cached"))
    """Stage mimic_sparse: dense-to-sparse mimic distillation."""
    preference: PreferenceParams = PreferenceParams(splits=["preference"], lr=1e-4, steps=100)
    """Stage preference: preference distillation (DPO family) with the teacher as reference."""
    dft: TrainingParams = TrainingParams(splits=["general", "multitask"], fraction=0.1, steps=250, teacher=TeacherUse(mode="cached"))
    """Stage dft: LLaVA-KD's distilled fine-tuning of the dense student (recipe llava-kd)."""
    evaluate: EvaluateParams = EvaluateParams()
    """Stage evaluate: lmms-eval on the teacher and every student."""
    register: RegisterParams = RegisterParams()
    """Stage register: MLflow model version, aliases and the review card."""


    @property
    def uses_world(self) -> bool:
        """Whether the embedded world is among curate.sources (its ground truth feeds vision pretraining and word alignment)."""
        return any(source.kind == "world" for source in self.curate.sources)

    @property
    def pipeline(self) -> tuple[str, ...]:
        """Every DVC stage this recipe runs, in order: the recipe's student stages between the shared ones."""
        students = [s for name in self.stages for s in ((name, "baseline") if name == "mimic_dense" else (name,))]
        return ("curate", "teacher", "teacher_cache", *students, "evaluate", "register")

    @property
    def final_model(self) -> str:
        """The student the recipe's last stage makes."""
        return STUDENT_STAGES[self.stages[-1]].makes

    @property
    def registered_model(self) -> str:
        return self.final_model if self.register.model == "final" else self.register.model

    @property
    def evaluated_models(self) -> list[str]:
        """``evaluate.models``, or by default the teacher, the baseline and every trained student of the recipe."""
        if self.evaluate.models is not None:
            return list(self.evaluate.models)
        made = [STUDENT_STAGES[name].makes for name in self.pipeline if name in STUDENT_STAGES and STUDENT_STAGES[name].trains and name != "align"]
        return ["teacher", *sorted(made, key=lambda m: m != "baseline")]

    def training_sections(self) -> list[tuple[str, TrainingParams]]:
        """The recipe's training stages with their params sections, in order."""
        return [(name, getattr(self, name)) for name in self.stages if STUDENT_STAGES[name].trains]

    @property
    def word_aligns(self) -> bool:
        """Whether align word-aligns the new student: the world among the sources, steps to take."""
        return self.uses_world and self.align.word_align.steps > 0


# ---------------------------------------------------------------- loading and checking


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    origin: str = ""

    def __str__(self) -> str:
        where = f"{self.origin}: " if self.origin else ""
        return f"{where}{self.key}: {self.message}"


class ParamsError(TinymodError, ValueError):
    """Raised with every problem of a params file; each line names a dotted key."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in params:\n{lines}")


def deep_merge(base: dict, override: dict) -> dict:
    """Dicts merge key by key; anything else in ``override`` replaces ``base``."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not "the last one wins"."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first_line: int, line: int):
        super().__init__(f"key {key!r} is given twice (lines {first_line} and {line}); YAML would silently keep the last")
        self.key = key


def read_params_file(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except FileNotFoundError:
        raise ParamsError([Problem(str(path), "file not found")]) from None
    except DuplicateKey as error:
        raise ParamsError([Problem(str(error.key), str(error), str(path))]) from None
    except yaml.YAMLError as error:
        raise ParamsError([Problem(str(path), f"not valid YAML: {error}")]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError([Problem(str(path), f"must be a mapping of sections, got {type(data).__name__}")])
    return data


def _key_path(loc: tuple) -> list:
    """``loc`` without the tags pydantic adds: a source's kind after an index of `curate.sources`, a fraction's form."""
    tags = ("world", "llava_json", "preference")
    return [
        part
        for i, part in enumerate(loc)
        if not (part in tags and i and isinstance(loc[i - 1], int)) and not (part in SHARES_TAGS and i and loc[i - 1] == "fraction")
    ]


def _dotted(loc: tuple) -> str:
    out = ""
    for part in _key_path(loc):
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def _has_key(data: dict, loc: tuple) -> bool:
    node: Any = data
    for part in loc:
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return False
    return True


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Params
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return sorted(getattr(model, "model_fields", {})) if model else []


def _problem_from_error(error: dict, layers: list[tuple[str, dict]]) -> Problem:
    loc = tuple(error["loc"])
    where = origin(_dotted(loc), layers, exact=error["type"] != "missing")
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
        return Problem(_dotted(loc), f"unknown key{hint}", where)
    message = error["msg"]
    if "input" in error and error["type"] != "missing" and not isinstance(error["input"], (dict, list)):
        message += f" (got {error['input']!r})"
    return Problem(_dotted(loc), message, where)


def trained_on_record(teacher: Path) -> dict:
    """What the ``teacher`` folder says it was trained on (``TRAINED_ON``); empty for a real teacher, or one made outside tinymod."""
    record = teacher / TRAINED_ON
    return json.loads(record.read_text()) if record.is_file() else {}


def world_differences(teacher: Path, world: WorldParams) -> dict[str, Any]:
    """``curate.world`` keys whose value differs from the world ``teacher`` was trained on, with that value.

    Empty when the folder records no world."""
    record = trained_on_record(teacher)
    if not record:
        return {}
    seen = record["curate.world"]
    current = world.model_dump(mode="json")
    return {key: seen.get(key) for key in sorted(set(seen) | set(current)) if seen.get(key) != current.get(key)}


def llm_config(llm: str) -> dict:
    """The pretrained student LLM's ``config.json``; empty for ``init`` or a folder without one (align reports that)."""
    config = Path(llm) / "config.json"
    return json.loads(config.read_text()) if llm != "init" and config.is_file() else {}


def student_shape_differences(student: StudentParams, config: dict) -> dict[str, Any]:
    """The keys written in ``student.text`` whose value differs from the pretrained LLM's ``config``, with the LLM's value.

    A pretrained LLM keeps its own shape: ``text`` only describes it, so a value written there that
    disagrees is a change the user expects and align would not make. Keys not written do not count:
    the default shape describes no particular LLM."""
    if "text" not in student.model_fields_set:
        return {}
    written = student.text.model_fields_set
    return {
        key: config[name]
        for key, name in TEXT_CONFIG_NAMES.items()
        if key in written and name in config and getattr(student.text, key) != config[name]
    }


def _cross_checks(p: Params) -> list[Problem]:
    """Problems no single field can see: sizes that must agree, names that must exist."""
    problems: list[Problem] = []
    world, vision = p.curate.world, p.teacher.vision
    shapes = set(world.shapes)
    for i, shape in enumerate(world.shapes):
        if shape not in SHAPES_DRAWN:
            problems.append(Problem(f"curate.world.shapes[{i}]", f"{shape!r} is not a shape the world draws ({', '.join(SHAPES_DRAWN)})"))
    if len(shapes) != len(world.shapes):
        problems.append(Problem("curate.world.shapes", "shapes must be unique"))
    for name in world.popularity:
        if name not in shapes:
            problems.append(Problem(f"curate.world.popularity.{name}", f"not one of curate.world.shapes ({', '.join(world.shapes)})"))
    for i, pairing in enumerate(world.pairings):
        for role in ("anchor", "partner"):
            if getattr(pairing, role) not in shapes:
                problems.append(Problem(f"curate.world.pairings[{i}].{role}", f"{getattr(pairing, role)!r} is not one of curate.world.shapes"))
        if pairing.anchor == pairing.partner:
            problems.append(Problem(f"curate.world.pairings[{i}]", "anchor and partner must differ"))
    if world.min_objects > world.max_objects:
        problems.append(Problem("curate.world.min_objects", f"must be <= curate.world.max_objects ({world.max_objects})"))
    if p.curate.min_image_side > p.curate.max_image_side:
        problems.append(Problem("curate.min_image_side", "must be <= curate.max_image_side"))
    if vision.image_size % vision.patch_size:
        problems.append(Problem("teacher.vision.patch_size", f"must divide teacher.vision.image_size ({vision.image_size})"))
    uses_world = p.uses_world
    if p.teacher.source == "train":
        if uses_world and vision.image_size != world.image_size:
            problems.append(Problem("teacher.vision.image_size", f"must equal curate.world.image_size ({world.image_size}) to train on the world"))
        if vision.image_size % vision.patch_size == 0 and p.curate.image_tokens != (vision.image_size // vision.patch_size) ** 2:
            problems.append(
                Problem("curate.image_tokens", f"must be (teacher.vision.image_size / patch_size)^2 = {(vision.image_size // vision.patch_size) ** 2}")
            )
    if uses_world and not p.teacher.source.startswith("s3://"):
        for key, seen in world_differences(Path(p.teacher.source), world).items():
            problems.append(
                Problem(
                    f"curate.world.{key}",
                    f"teacher {p.teacher.source} was trained on {seen!r}; set teacher.source: train "
                    "(and curate.tokenizer.source: world) to train a teacher on this world",
                )
            )
    grid_users = {
        "teacher.vision_pretrain.steps": uses_world and p.teacher.source == "train" and p.teacher.vision_pretrain.steps,
        "align.word_align.steps": p.word_aligns,
    }
    for key in [k for k, used in grid_users.items() if used]:
        if vision.image_size % vision.patch_size == 0 and (vision.image_size // vision.patch_size) % 3:
            problems.append(
                Problem("teacher.vision.patch_size", f"{key} needs image_size / patch_size to be a multiple of 3 (the world's grid), got {vision.image_size // vision.patch_size}")
            )
    for prefix, text in (("teacher.text", p.teacher.text), ("align.student.text", p.align.student.text)):
        if text.hidden_size % text.heads:
            problems.append(Problem(f"{prefix}.heads", f"must divide {prefix}.hidden_size ({text.hidden_size})"))
        if text.heads % text.kv_heads:
            problems.append(Problem(f"{prefix}.kv_heads", f"must divide {prefix}.heads ({text.heads})"))
    if vision.hidden_size % vision.heads:
        problems.append(Problem("teacher.vision.heads", f"must divide teacher.vision.hidden_size ({vision.hidden_size})"))
    up = p.upcycle
    if up.top_k > up.num_experts:
        problems.append(Problem("upcycle.top_k", f"must be <= upcycle.num_experts ({up.num_experts})"))
    if p.align.student.sha256 and p.align.student.llm == "init":
        problems.append(Problem("align.student.sha256", "pins a pretrained LLM's weights, and align.student.llm is init: set it to null"))
    try:
        student_llm = llm_config(p.align.student.llm)
    except ValueError as error:
        student_llm = {}
        problems.append(Problem("align.student.llm", f"{p.align.student.llm}/config.json is not valid JSON ({error}); point it at a Hugging Face causal LM folder"))
    for key, value in student_shape_differences(p.align.student, student_llm).items():
        problems.append(
            Problem(
                f"align.student.text.{key}",
                f"is {getattr(p.align.student.text, key)!r}, but align.student.llm {p.align.student.llm} has {value!r}: "
                f"a pretrained LLM keeps its own shape; write {value!r} or leave the key out (or set align.student.llm: init)",
            )
        )
    if isinstance(up.layers, list) and (p.align.student.llm == "init" or student_llm):
        n = student_llm.get("num_hidden_layers", p.align.student.text.layers)
        for i, layer in enumerate(up.layers):
            if layer >= n:
                problems.append(Problem(f"upcycle.layers[{i}]", f"layer {layer} does not exist: the student has {n} layers (0..{n - 1})"))
    if up.shared_expert and p.align.student.llm == "init" and p.align.student.text.family == "qwen3":
        problems.append(Problem("upcycle.shared_expert", "Qwen3-MoE has no shared expert; use align.student.text.family: qwen2"))
    if up.shared_expert and "upcycle" in p.stages and not any(
        {"shared_expert", "llm"} & set(section.modules) for name, section in p.training_sections() if STUDENT_STAGES[name].moe
    ):
        problems.append(
            Problem(
                "upcycle.shared_expert",
                "no stage after upcycling trains the shared expert, which starts at zero output and would stay there; "
                "add shared_expert to mimic_sparse.modules",
            )
        )
    problems += _graph_problems(p)
    for name, stage in [("teacher.train", p.teacher.train), *p.training_sections()]:
        role = STUDENT_STAGES.get(name)  # None: the embedded teacher's own training
        moe, pairs = role is not None and role.moe, role is not None and role.pairs
        if not stage.modules:
            problems.append(Problem(f"{name}.modules", "nothing to train: list at least one module (the recipe usually sets this)"))
        weights = stage.loss.model_dump()
        if not any(weights.values()):
            problems.append(Problem(f"{name}.loss", "every loss weight is zero: nothing to optimise"))
        per_rank, uneven = divmod(stage.batch_size, stage.world_size)
        if uneven:
            problems.append(Problem(f"{name}.batch_size", f"must be divisible by {name}.world_size ({stage.world_size})"))
        elif per_rank % min(stage.micro_batch_size, per_rank):
            problems.append(
                Problem(f"{name}.micro_batch_size", f"must divide the per-rank batch (batch_size / world_size = {per_rank})")
            )
        if stage.hostfile and stage.launcher != "deepspeed":
            problems.append(Problem(f"{name}.hostfile", "a hostfile needs the deepspeed launcher: set launcher: deepspeed"))
        if not pairs and "preference" in stage.splits:
            problems.append(Problem(f"{name}.splits", "the preference split only feeds the preference stage"))
        if not pairs and weights["dpo"]:
            problems.append(Problem(f"{name}.loss.dpo", "the DPO term needs preference pairs: only the preference stage may use it"))
        if role is None and any(weights[k] for k in TEACHER_TERMS):
            problems.append(Problem(f"{name}.loss", "the teacher has no teacher: only ce (and router_aux) apply"))
        if stage.teacher.mode == "cached":
            if role is None or pairs:
                why = "the teacher has no teacher" if role is None else "preference scores its reference once per pair already"
                problems.append(Problem(f"{name}.teacher.mode", f"{why}: use mode: live"))
            if stage.distill_all_tokens:
                problems.append(Problem(f"{name}.teacher.mode", "the cache holds response and image positions only: set distill_all_tokens: false or mode: live"))
            if stage.teacher.top_k > p.teacher_cache.top_k:
                problems.append(Problem(f"{name}.teacher.top_k", f"must be <= teacher_cache.top_k ({p.teacher_cache.top_k}), what the cache stores"))
        if not moe and weights["router_aux"]:
            problems.append(Problem(f"{name}.loss.router_aux", "the model is dense at this stage: router_aux needs an MoE student"))
        moe_only = {"experts", "router", "shared_expert"} & set(stage.modules)
        if not moe and moe_only:
            problems.append(Problem(f"{name}.modules", f"{', '.join(sorted(moe_only))} exist only after upcycling"))
        if moe and stage.zero_stage == 3 and stage.world_size > 1:
            problems.append(
                Problem(
                    f"{name}.zero_stage",
                    "ZeRO-3 over several ranks fails on the MoE student's fused expert weights (DeepSpeed's partition_parameters: "
                    "'expected a non-empty list of Tensors'); use zero_stage: 2 (optimizer states and gradients sharded) or world_size: 1",
                )
            )
    if "preference" not in p.stages:
        return problems
    for term in ("ce", "kl_response", "kl_visual", "relation"):
        if getattr(p.preference.loss, term):
            problems.append(
                Problem(f"preference.loss.{term}", "the preference stage trains on pairs with dpo (+ router_aux); use preference.dpo.sft_weight for an SFT term")
            )
    if p.preference.splits != ["preference"]:
        problems.append(Problem("preference.splits", "the preference stage trains on [preference] only"))
    if not p.preference.loss.dpo:
        problems.append(Problem("preference.loss.dpo", "must be > 0: it is the preference stage's objective"))
    return problems


def _graph_problems(p: Params) -> list[Problem]:
    """The recipe's stages must form a chain: each starts from a student an earlier one made."""
    problems: list[Problem] = []
    made = {"teacher"}
    for i, name in enumerate(p.stages):
        stage = STUDENT_STAGES[name]
        if name in p.stages[:i]:
            problems.append(Problem(f"stages[{i}]", f"{name} is listed twice"))
        elif stage.reads is not None and stage.reads not in made:
            maker = next(n for n, s in STUDENT_STAGES.items() if s.makes == stage.reads)
            problems.append(Problem(f"stages[{i}]", f"{name} starts from the student {maker} makes: list {maker} before it"))
        made |= {stage.makes} | ({"baseline"} if name == "mimic_dense" else set())
    if p.stages and not STUDENT_STAGES[p.stages[-1]].trains:
        problems.append(Problem("stages", f"the last stage makes the final student, and {p.stages[-1]} trains nothing: end with a training stage"))
    if p.stages and p.stages[0] != "align":
        problems.append(Problem("stages[0]", "the first student stage must be align: it builds the student"))
    for task in p.evaluate.local_data:
        if task not in p.evaluate.tasks:
            problems.append(Problem(f"evaluate.local_data.{task}", f"not one of evaluate.tasks ({', '.join(p.evaluate.tasks)})"))
        elif task.startswith("tinymod_"):
            problems.append(Problem(f"evaluate.local_data.{task}", "tinymod's tasks read the curated probes; local_data is for stock lmms-eval tasks"))
    for i, model in enumerate(p.evaluate.models or []):
        if model not in made:
            problems.append(Problem(f"evaluate.models[{i}]", f"no stage of this recipe makes {model!r} (stages: {', '.join(p.stages)})"))
    if p.register.model != "final" and p.register.model not in made:
        problems.append(Problem("register.model", f"no stage of this recipe makes {p.register.model!r}; final is {p.final_model!r}"))
    return problems


class Layers(list):
    """``(file name, mapping)`` pairs, lowest priority first, and the problems met reading them.

    A recipe or preset that cannot be read is a problem reported with all the others, not alone.
    """

    def __init__(self, root: Path):
        super().__init__()
        self.root = root  # the project the params are for: relative source paths start here
        self.problems: list[Problem] = []


def load_layers(params: dict, root: Path, name: str = "params.yaml") -> Layers:
    """The mappings that make up ``params``' resolved values, lowest priority first, each with its file name."""
    layers = Layers(root)
    recipe = params.get("recipe", Params.model_fields["recipe"].default)
    preset = params.get("preset", Params.model_fields["preset"].default)
    if isinstance(recipe, str):
        layers.append((f"recipes/{recipe}.yaml", _read_layer(root / "recipes" / f"{recipe}.yaml", "recipe", recipe, layers.problems)))
    layers.append((name, params))
    if isinstance(preset, str):
        layers.append((f"presets/{preset}.yaml", _read_layer(root / "presets" / f"{preset}.yaml", "preset", preset, layers.problems)))
    return layers


def _read_layer(path: Path, key: str, name: str, problems: list[Problem]) -> dict:
    if not path.exists() and (REPO / path.parent.name / path.name).exists():
        path = REPO / path.parent.name / path.name  # a params file outside the repo uses the repo's recipes
    if not path.exists():
        folders = {path.parent, REPO / path.parent.name}
        available = sorted({q.stem for folder in folders for q in folder.glob("*.yaml")})
        problems.append(Problem(key, f"{name!r} has no file {path}; available: {', '.join(available) or 'none'}"))
        return {}
    try:
        return read_params_file(path)
    except ParamsError as error:
        problems.extend(error.problems)
        return {}


def _masked(layers: list[tuple[str, dict]]) -> list[Problem]:
    """Bad values in the files below the preset: the preset overrides them today, but they are still wrong."""
    if len(layers) < 2 or not layers[-1][0].startswith("presets/"):
        return []
    below = layers[:-1]
    merged: dict = Params().model_dump(mode="json")
    for _, data in below:
        merged = deep_merge(merged, data)
    try:
        Params.model_validate(merged)
    except ValidationError as error:
        found = [_problem_from_error(e, below) for e in error.errors() if e["loc"]]
        preset = layers[-1][0]
        # Keys the preset does not set are reported by the full validation already.
        return [Problem(p.key, f"{p.message} (masked by {preset}, which sets this key, but wrong here)", p.origin) for p in found if origin(p.key, layers) == preset]
    return []


def resolve(layers: list[tuple[str, dict]]) -> Params:
    # Start from the full defaults so a partly given section keeps the defaults of the rest.
    merged: dict = Params().model_dump(mode="json")
    for _, data in layers:
        merged = deep_merge(merged, data)
    first = [*getattr(layers, "problems", []), *_masked(layers)]
    try:
        params = _checked(Params.model_validate(merged), layers)
        if first:
            raise ParamsError(first)
        return params
    except ParamsError as cross:
        raise ParamsError(first + [p for p in cross.problems if p not in first]) from None
    except ValidationError as error:
        field_error = error
    problems = first + [_problem_from_error(e, layers) for e in field_error.errors()]
    # Report cross-field problems too: check again with every bad key back at its default
    # (twice more at most, as removing an item can empty a list that must not be empty).
    for _ in range(3):
        merged = _without_errors(merged, field_error)
        try:
            _checked(Params.model_validate(merged), layers)
            break
        except ParamsError as cross:
            problems += [p for p in cross.problems if p not in problems]
            break
        except ValidationError as error:
            field_error = error
    raise ParamsError(problems)


def _source_problems(p: Params, root: Path) -> list[Problem]:
    """Source files and folders that do not exist; relative paths are the stages', from the project root."""
    problems = []
    for i, source in enumerate(p.curate.sources):
        if source.kind != "world" and not (root / source.path).is_file():
            problems.append(Problem(f"curate.sources[{i}].path", f"{source.path}: no such file"))
        needs_root = source.kind == "llava_json" or (source.kind == "preference" and not source.path.endswith(".parquet"))
        if needs_root and not (root / source.image_root).is_dir():
            problems.append(Problem(f"curate.sources[{i}].image_root", f"{source.image_root}: no such folder"))
    return problems


def _checked(params: Params, layers: list[tuple[str, dict]]) -> Params:
    problems = _cross_checks(params)
    if isinstance(layers, Layers):
        problems += _source_problems(params, layers.root)
    if problems:
        raise ParamsError([Problem(pr.key, pr.message, origin(pr.key, layers)) for pr in problems])
    return params


def _without_errors(merged: dict, error: ValidationError) -> dict:
    """``merged`` without the key (or list item) behind each error, so defaults take their place."""
    cleaned = copy.deepcopy(merged)
    targets = []
    for e in error.errors():
        loc = _key_path(tuple(e["loc"]))
        targets.append(loc[:-1] if e["type"] == "missing" else loc)
    # Deepest and last first, so removing a list item never shifts another target.
    for loc in sorted(targets, key=lambda t: [str(x).zfill(9) for x in t], reverse=True):
        node: Any = cleaned
        for part in loc[:-1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                node = None
                break
        if isinstance(node, dict):
            node.pop(loc[-1], None)
        elif isinstance(node, list) and isinstance(loc[-1], int) and loc[-1] < len(node):
            node.pop(loc[-1])
    return cleaned


def origin(dotted: str, layers: list[tuple[str, dict]], exact: bool = True) -> str:
    """The last file that sets ``dotted`` (or, for a missing key, its parent); '' for a default."""
    parts: list[Any] = []
    for piece in dotted.replace("]", "").replace("[", ".").split("."):
        parts.append(int(piece) if piece.isdigit() else piece)
    for depth in range(len(parts), 0 if not exact else len(parts) - 1, -1):
        found = next((name for name, data in reversed(layers) if _has_key(data, tuple(parts[:depth]))), "")
        if found:
            return found
    return ""


def load_params(path: str | Path = "params.yaml") -> Params:
    """Resolve and validate ``path``; raises :class:`ParamsError` listing every problem."""
    path = Path(path)
    return resolve(load_layers(read_params_file(path), path.resolve().parent, path.name))


def validate_file(path: Path) -> list[Problem]:
    """Problems of one shipped file: a params file, or a recipe / preset applied to the params.yaml beside its folder."""
    try:
        kind = {"recipes": "recipe", "presets": "preset"}.get(path.parent.name)
        if kind:
            root = path.resolve().parent.parent
            base = read_params_file(root / "params.yaml") if (root / "params.yaml").exists() else {}
            read_params_file(path)
            resolve(load_layers({**base, kind: path.stem}, root))
        else:
            load_params(path)
    except ParamsError as error:
        return error.problems
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.params", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("validate", help="check a params, recipe or preset file; exit 1 listing every problem")
    check.add_argument("files", nargs="*", type=Path, default=[Path("params.yaml")])
    show = sub.add_parser("show", help="print the resolved params (defaults < recipe < file < preset) as YAML")
    show.add_argument("file", nargs="?", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    if args.command == "show":
        try:
            print(yaml.safe_dump(load_params(args.file).model_dump(mode="json"), sort_keys=False), end="")
        except ParamsError as error:
            print(error, file=sys.stderr)
            return 1
        return 0
    failed = False
    for path in args.files:
        problems = validate_file(path)
        if problems:
            failed = True
            print(f"{path}: {len(problems)} problem(s)", file=sys.stderr)
            for problem in problems:
                print(f"  - {problem}", file=sys.stderr)
        else:
            print(f"{path}: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
