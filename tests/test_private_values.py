"""What leaves the machine is public by construction: privacy-unit ids never split one person into several units, the
label set an adapter publishes is the base's or a public list (the data's only on request, and then the card says
so), the model card names the privacy unit and lists every release outside epsilon, and errors and warnings give
counts and row numbers, never a private value (a label, a unit id, a file's path)."""

import json
import logging
import math
import traceback
from dataclasses import fields

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset, load_dataset
from helpers import base_args, digit_folder, one_line, report_folder, tiny_vae, train
from PIL import Image

from dp_diffusers import DPLDMPipeline
from dp_diffusers.constants import ADAPTER_CONFIG_NAME, DP_REPORT_NAME
from dp_diffusers.data import (
    DIGIT_NAMES,
    DataError,
    dataset_latents,
    load_image_dataset,
    privacy_unit_members,
    unit_members,
)
from dp_diffusers.families import CompVisLDMFamily, ConditionOptions, DiTFamily, DPLDMFamily
from dp_diffusers.families.stable_diffusion_xl import upright_sizes
from dp_diffusers.hub import build_model_card
from dp_diffusers.privacy import DPReport

SECRET = "secret-name"  # a private value: a label, a unit id, a folder; it must appear in no message or card

# ---- privacy-unit ids -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", [float("nan"), np.float32("nan"), None, "", "   "], ids=repr)
def test_a_missing_unit_id_is_an_error_with_counts_and_rows_never_one_unit_per_row(missing):
    ids = [f"{SECRET}-1", missing, f"{SECRET}-2", missing, f"{SECRET}-1"]
    with pytest.raises(DataError, match=r"Rows 1, 3 have an empty 'person' \(2 of 5 rows: None, NaN") as error:
        unit_members(ids, "person")
    assert SECRET not in str(error.value)
    # NaN != NaN: as dict keys, every NaN row would have been a unit of its own (sensitivity k*C for that person)
    nan_rows = Dataset.from_dict({"person": [1.0, math.nan, 2.0, math.nan]})  # a Hub data set's missing floats
    with pytest.raises(DataError, match=r"Rows 1, 3 have an empty 'person' \(2 of 4 rows"):
        privacy_unit_members(nan_rows, "person")
    frame = Dataset.from_pandas(pd.DataFrame({"person": [1.0, np.nan, 2.0]}))  # a DataFrame's NaN (read as None)
    with pytest.raises(DataError, match=r"Rows 1 have an empty 'person' \(1 of 3 rows"):
        privacy_unit_members(frame, "person")


def test_ids_that_differ_only_by_surrounding_whitespace_are_one_unit():
    data = Dataset.from_dict({"person": [" p1", "p1", "p2", "p1 ", "\tp2\n", "p3"]})
    assert privacy_unit_members(data, "person") == [[0, 1, 3], [2, 4], [5]]
    floats = Dataset.from_dict({"person": [1.0, 2.0, 1.0]})  # one type: compared as their text
    assert privacy_unit_members(floats, "person") == [[0, 2], [1]]


def test_ids_of_mixed_types_are_an_error_that_shows_no_id(tmp_path):
    for ids in ([1, "1", " 1"], [1, 1.0], [True, 1]):
        with pytest.raises(DataError, match="holds ids of several types"):
            unit_members(ids, "person")
    rows = [{"person": 7}, {"person": f"{SECRET}"}, {"person": 7}, {"person": f"{SECRET}"}, {"person": 8}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    data = load_dataset("json", data_files=str(tmp_path / "rows.jsonl"), split="train")  # a JSON column of both
    with pytest.raises(DataError, match=r"3 integer \(rows 0, 2, 4\); 2 text \(rows 1, 3\)") as error:
        privacy_unit_members(data, "person")
    assert SECRET not in str(error.value) and "7" not in str(error.value)


# ---- the label set an adapter publishes ---------------------------------------------------------------------------


@pytest.fixture
def secret_labels(tmp_path):
    """An imagefolder of 3 classes, 15 images each: two the tiny base knows ('3', '7') and a private one."""
    data = digit_folder(tmp_path / "data", ["3", "7", SECRET])
    return load_image_dataset(train_data_dir=str(data))


def prepare(base, dataset, **options):
    pipe = DPLDMPipeline.from_pretrained(base)
    return DPLDMFamily.prepare_examples(pipe, dataset, "image", "label", 16, ConditionOptions(**options))


def test_the_label_set_is_the_base_s_classes_and_a_private_label_is_refused_by_count_and_rows(tiny_base, tmp_path,
                                                                                               secret_labels):
    known = secret_labels.filter(lambda label: label != 2, input_columns="label")  # only '3' and '7'
    examples = prepare(tiny_base, known)
    assert examples.names == DIGIT_NAMES  # all the base's classes, not the two the data holds
    assert examples.id2label == {i: str(i) for i in range(10)} and not examples.names_from_data
    assert sorted(set(examples.labels.tolist())) == [3, 7]
    with pytest.raises(DataError, match=r"15 of 45 rows \(rows 30, 31, 32, 33, 34, \.\.\. \(15 in all\)\) have labels "
                                        r"outside the base model's classes .*--class_names") as error:
        prepare(tiny_base, secret_labels, train_class_embedding=True)
    assert SECRET not in str(error.value)


def test_class_names_are_the_public_label_set_and_rows_outside_it_are_refused(tiny_base, secret_labels):
    public = ["3", "7", SECRET, "unseen"]  # given on the command line: public, so quoted in errors
    with pytest.raises(DataError, match=r"\['secret-name', 'unseen'\] are unknown to the base model"):
        prepare(tiny_base, secret_labels, class_names=public)
    examples = prepare(tiny_base, secret_labels, class_names=public, train_class_embedding=True)
    assert examples.names == public and examples.id2label[10] == SECRET and examples.id2label[11] == "unseen"
    assert examples.labels.tolist() == [3] * 15 + [7] * 15 + [10] * 15  # 'unseen' has a row, but no example
    with pytest.raises(DataError, match=r"15 of 45 rows \(rows 30, .*\) have labels outside the public class names "
                                        r"\['3', '7'\]"):
        prepare(tiny_base, secret_labels, class_names=["3", "7"])
    for bad in (["3", "3"], ["3", " "]):
        with pytest.raises(DataError, match="--class_names must be distinct, non-empty names"):
            prepare(tiny_base, secret_labels, class_names=bad, train_class_embedding=True)


def test_class_names_may_use_a_dit_synonym_but_not_name_one_class_twice(tiny_dit_base, tmp_path):
    pipe = DPLDMPipeline.from_pretrained(tiny_dit_base)
    options = ConditionOptions(class_names=["three", "seven", SECRET], train_class_embedding=True)
    data = load_image_dataset(train_data_dir=str(digit_folder(tmp_path / "data", ["7", SECRET, "three"])))
    examples = DiTFamily.prepare_examples(pipe, data, "image", "label", 16, options)
    assert examples.labels.tolist() == [7] * 15 + [1002] * 15 + [1001] * 15  # '7' is 'seven, 7'; 'three' is new
    assert [examples.class_ids[name] for name in examples.names] == [1001, 7, 1002]  # each listed class once
    twice = ConditionOptions(class_names=["seven", "7"], train_class_embedding=True)
    with pytest.raises(DataError, match="names one class of the base twice"):
        DiTFamily.prepare_examples(DPLDMPipeline.from_pretrained(tiny_dit_base), data, "image", "label", 16, twice)


def test_the_data_s_names_only_on_request_and_then_the_card_says_they_are_released(tiny_base, tmp_path):
    data = digit_folder(tmp_path / "data", ["3", "7", SECRET])
    flags = {"--train_data_dir": data, "--max_train_samples": None, "--batch_size": 9, "--target_delta": 1e-3,
             "--max_train_steps": 2, "--train_class_embedding": True}  # fmt: skip
    with pytest.raises(DataError, match="have labels outside the base model's classes") as error:
        train(base_args(tiny_base, tmp_path / "refused", **flags))
    assert SECRET not in str(error.value) and not (tmp_path / "refused" / ADAPTER_CONFIG_NAME).exists()
    out = tmp_path / "from-data"
    train(base_args(tiny_base, out, **flags, **{"--class_names_from_data": True}))
    assert json.loads((out / ADAPTER_CONFIG_NAME).read_text())["id2label"]["10"] == SECRET
    assert json.loads((out / DP_REPORT_NAME).read_text())["class_names_from_data"] is True
    card = one_line((out / "README.md").read_text())
    assert "**The class names**, taken from the private data (`--class_names_from_data`)" in card
    both = base_args(tiny_base, tmp_path / "both", **flags, **{"--class_names_from_data": True})
    with pytest.raises(SystemExit):  # one label set: a public list or the data's
        train([*both, "--class_names", "3"])


def test_class_names_are_refused_where_there_are_no_classes(tiny_ldm_base, tmp_path):
    with pytest.raises(DataError, match="--class_names / --class_names_from_data set the labels of a "
                                        "class-conditional base; this compvis-ldm base is unconditional"):
        train(base_args(tiny_ldm_base, tmp_path / "out") + ["--class_names", "0", "1"])


# ---- the model card: the unit, and every release outside epsilon ---------------------------------------------------

#: wording that is true of an example-level run only
PER_EXAMPLE = ["each example's", "an example is", "per example", "per-example", "individual examples",
               "one training example", "passes over the private data", "that example", "scores each example",
               "Per example, not per person", "any single example"]  # fmt: skip
METRICS = {"downstream_accuracy": {"value": 0.8, "classifier": "small CNN"}, "membership_auc": {"value": 0.5}}


def test_a_user_level_card_names_the_unit_everywhere_and_has_no_per_example_wording(tmp_path):
    folder = report_folder(tmp_path / "people", METRICS, privacy_unit="patient", num_privacy_units=139,
                           max_examples_per_unit=16, sample_rate=64 / 139, group_privacy=[])  # fmt: skip
    card = build_model_card(folder)
    text = one_line(card.text)
    assert not [phrase for phrase in PER_EXAMPLE if phrase.lower() in text.lower()]
    assert "| Sample rate q | 0.4604 | probability that a `patient` (with their examples) is sampled in a step" in text
    assert "| Clipping norm C | 0.001 | bound on each `patient`'s gradient norm" in text
    assert "| Epochs (over people) | 20 | steps × q: the expected number of steps each `patient` is sampled in" in text
    assert "| Batch size | 64 | expected `patient`s per step (logical batch) |" in text
    assert "DP protects each `patient` (all of their examples together)" in text
    assert card.data.dp_privacy_unit == "patient" and card.data.dp_num_privacy_units == 139
    example_level = build_model_card(report_folder(tmp_path / "examples"))
    assert example_level.data.dp_privacy_unit == "example" and example_level.data.dp_num_privacy_units == 1437
    assert "probability that an example is in a batch" in one_line(example_level.text)


def test_the_report_s_field_help_names_the_privacy_unit():
    help_of = {f.name: f.metadata["help"] for f in fields(DPReport)}
    for name in ("max_grad_norm", "sample_rate", "epochs", "batch_size"):
        assert "privacy unit" in help_of[name] and "person" in help_of[name], name


def test_the_card_lists_every_release_outside_epsilon(tmp_path):
    def releases(**report) -> str:
        text = one_line(build_model_card(report_folder(tmp_path / str(len(report)), **report)).text)
        return text.split("### Released outside ε", 1)[1].split("##", 1)[0]

    plain = releases()
    assert "**The exact size of the private set**: 1,437 examples, stated without noise, as opacus does" in plain
    assert "evaluation" not in plain and "class names" not in plain and "loss" not in plain
    full = releases(metrics=METRICS, class_names_from_data=True, loss_trackers=["wandb"], privacy_unit="person",
                    num_privacy_units=139)  # fmt: skip
    assert "1,437 examples of 139 `person`s" in full
    assert "**The evaluation's numbers** (the Evaluation table, `metrics.json`): computed without noise" in full
    assert "**The class names**, taken from the private data" in full
    assert "**The training loss curve**: each step's loss on its private batch, sent without noise" in full
    assert "**The training loss curve**" not in releases(loss_trackers=[])
    assert "trackers (`--report_private_loss`: `wandb`)" in full
    (tmp_path / "empty").mkdir()
    assert "Released outside ε" not in build_model_card(tmp_path / "empty").text  # no report: no DP claim at all


# ---- errors and warnings: counts and rows, never a private value ----------------------------------------------------


def test_an_unreadable_image_is_named_by_its_row_never_by_its_path(tmp_path):
    folder = tmp_path / SECRET / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"not a png")
    data = load_image_dataset(train_data_dir=str(tmp_path / SECRET))
    for read in (lambda: dataset_latents(data, tiny_vae().eval(), 16), lambda: upright_sizes(data, "image")):
        with pytest.raises(DataError, match=r"Image 3 of the data set cannot be read \(UnidentifiedImageError") as err:
            read()
        shown = "".join(traceback.format_exception(err.value))  # the whole traceback a user would paste
        assert SECRET not in shown and "3.png" not in shown


def test_folder_errors_name_the_flag_not_the_path(tmp_path):
    with pytest.raises(DataError, match="--train_data_dir does not exist") as missing:
        load_image_dataset(train_data_dir=str(tmp_path / SECRET))
    (tmp_path / SECRET).mkdir()
    with pytest.raises(DataError, match="--train_data_dir holds no image files") as empty:
        load_image_dataset(train_data_dir=str(tmp_path / SECRET))
    assert SECRET not in str(missing.value) + str(empty.value)


def test_an_unconditional_base_s_warning_counts_the_labels_it_ignores(secret_labels, caplog):
    with caplog.at_level(logging.WARNING):
        CompVisLDMFamily.prepare_examples(None, secret_labels, "image", "label", 16, ConditionOptions())
    assert "the data's labels (column 'label', 3 classes) are not used" in caplog.text
    assert SECRET not in caplog.text
