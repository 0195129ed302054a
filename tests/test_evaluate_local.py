"""Stock lmms-eval tasks (the papers' own benchmarks) on local copies of their datasets."""

from __future__ import annotations

import pytest

from .conftest import write_params


def test_stock_lmms_eval_tasks_run_on_local_copies_of_their_datasets(tiny_llava, tiny_tokenizer, tmp_path):
    """evaluate.tasks: [pope, mme] with evaluate.local_data: a handful of records in each dataset's own format."""
    import datasets
    from PIL import Image

    from model.builders import build_processor
    from tasks.common import StagePaths
    from tasks.evaluate import evaluate
    from tasks.params import load_params

    def local_copy(name: str, rows: dict) -> str:
        folder = tmp_path / name
        folder.mkdir()
        images = [Image.new("RGB", (64, 48), (40 * i, 120, 200)) for i in range(len(rows["question"]))]
        data = datasets.Dataset.from_dict({**rows, "image": images}).cast_column("image", datasets.Image())
        data.to_parquet(str(folder / "test-00000-of-00001.parquet"))  # the hub's layout: <split>-*.parquet
        return str(folder)

    pope = local_copy("POPE", {
        "id": ["0", "1", "2", "3"], "question_id": ["1", "2", "3", "4"], "answer": ["yes", "no", "yes", "no"],
        "question": ["Is there a dog in the image?", "Is there a car in the image?", "Is there a cup in the image?", "Is there a kite in the image?"],
        "image_source": ["COCO_val2014_000000000001"] * 4, "category": ["adversarial", "adversarial", "popular", "random"],
    })  # fmt: skip
    mme = local_copy("MME", {
        "question_id": ["code_reasoning/0020.png"] * 2 + ["color/000000008277.jpg"] * 2,
        "question": ["Is the output 1? Please answer yes or no.", "Is the output 2? Please answer yes or no.",
                     "Is there a red coat in the image? Please answer yes or no.", "Is there a blue coat in the image? Please answer yes or no."],
        "answer": ["Yes", "No", "Yes", "No"], "category": ["code_reasoning", "code_reasoning", "color", "color"],
    })  # fmt: skip
    root = tmp_path / "project"
    tiny_llava.save_pretrained(root / "models/teacher", safe_serialization=True)
    build_processor(tiny_tokenizer, tiny_llava.config.vision_config).save_pretrained(root / "models/teacher")
    overrides = {"preset": "ci", "evaluate": {"tasks": ["pope", "mme"], "local_data": {"pope": pope, "mme": mme}, "models": ["teacher"]}}
    params = load_params(write_params(root, overrides))
    metrics = evaluate(params, StagePaths(params, root))
    scores = metrics["models"]["teacher"]["tasks"]
    assert set(scores) == {"pope", "mme"}
    assert 0.0 <= scores["pope"]["pope_accuracy"] <= 1.0 and {"pope_f1_score", "pope_yes_ratio"} <= set(scores["pope"])
    assert {"mme_cognition_score", "mme_perception_score"} <= set(scores["mme"])
    bad = write_params(tmp_path / "bad", {"evaluate": {"local_data": {"gqa": pope}}})
    with pytest.raises(Exception, match=r"evaluate.local_data.gqa: not one of evaluate.tasks"):
        load_params(bad)
