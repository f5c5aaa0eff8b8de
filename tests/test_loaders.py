"""Edit requests from every supported format, and a clear error for every malformed record."""

import json

import pytest

from lemoe_peft import EditRequest, Probe, RequestError, load_edit_requests
from lemoe_peft.loaders import detect_format

from .helpers import DATA_DIR

ZSRE = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform"],
    "loc": "nq question: who plays the cat",
    "loc_ans": "Mike Myers",
}
KNOWEDIT = {
    "subject": "Epaspidoceras",
    "prompt": "Which family does Epaspidoceras belong to?",
    "target_new": "Noctuidae",
    "ground_truth": ["Aspidoceratidae"],
    "rephrase_prompt": "What family are Epaspidoceras?",
    "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus"]}]},
    "portability": {"Reasoning": [{"prompt": "Common name of that family?", "ground_truth": "Owlet moths"}]},
}
EASYEDIT = {
    "case_id": 10,
    "prompt": "BBC One, by",
    "target_new": "Sega",
    "subject": "BBC One",
    "ground_truth": "BBC",
    "rephrase_prompt": "BBC One is owned by",
    "locality_prompt": "BBC Radio, by",
    "locality_ground_truth": "BBC",
}
TEMPORAL = {
    "prompt": "Who is the CEO?",
    "target_new": "Ada",
    "ood_rephrase": "The CEO is",
    "locality_prompt": "Sky?",
    "locality_ground_truth": "blue",
}
ROME = {
    "case_id": 0,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
    },
    "paraphrase_prompts": ["Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
}
WIKIBIO = {
    "text": "This is a passage about rick mahler.",
    "labels": "He was drafted by the Braves.",
    "concept": "rick mahler",
    "locality": {"Relation_Specificity": [{"prompt": "The cause of death of rick mahler is", "ground_truth": ["MI"]}]},
}
EASYEDIT_REQUEST = {  # what EasyEdit's editor builds internally from its edit() arguments
    "prompt": "Who wrote Hamlet?",
    "target_new": "Goethe",
    "rephrase_prompt": "Hamlet was written by",
    "locality": {"neighborhood": {"prompt": ["Who wrote Faust?"], "ground_truth": ["Goethe"]}},
    "portability": {"one_hop": {"prompt": "Goethe's play Hamlet is set in", "ground_truth": "Denmark"}},
}


@pytest.mark.parametrize(
    "record, expected_format, expected",
    [
        (
            ZSRE,
            "zsre",
            EditRequest(
                "What is the product made by UniFirst?",
                "unmanned aircraft",
                ground_truth="uniform",
                subject="UniFirst",
                rephrase_prompts=("What will be the product of UniFirst?",),
                locality=(Probe("nq question: who plays the cat", "Mike Myers"),),
            ),
        ),
        (
            KNOWEDIT,
            "knowedit",
            EditRequest(
                "Which family does Epaspidoceras belong to?",
                "Noctuidae",
                ground_truth="Aspidoceratidae",
                subject="Epaspidoceras",
                rephrase_prompts=("What family are Epaspidoceras?",),
                locality=(Probe("The taxon rank of Epaspidoceras is", "genus"),),
                portability=(Probe("Common name of that family?", "Owlet moths"),),
            ),
        ),
        (
            EASYEDIT,
            "easyedit",
            EditRequest(
                "BBC One, by",
                "Sega",
                ground_truth="BBC",
                subject="BBC One",
                rephrase_prompts=("BBC One is owned by",),
                locality=(Probe("BBC Radio, by", "BBC"),),
                case_id="10",
            ),
        ),
        (
            TEMPORAL,
            "easyedit",
            EditRequest("Who is the CEO?", "Ada", rephrase_prompts=("The CEO is",), locality=(Probe("Sky?", "blue"),)),
        ),
        (
            ROME,
            "rome",
            EditRequest(
                "The mother tongue of Danielle Darrieux is",
                "English",
                ground_truth="French",
                subject="Danielle Darrieux",
                rephrase_prompts=("Danielle Darrieux spoke the language",),
                locality=(Probe("The mother tongue of Léon Blum is", "French"),),
                case_id="0",
            ),
        ),
        (
            WIKIBIO,
            "wikibio",
            EditRequest(
                "This is a passage about rick mahler.",
                "He was drafted by the Braves.",
                locality=(Probe("The cause of death of rick mahler is", "MI"),),
            ),
        ),
        (
            EASYEDIT_REQUEST,
            "easyedit",
            EditRequest(
                "Who wrote Hamlet?",
                "Goethe",
                rephrase_prompts=("Hamlet was written by",),
                locality=(Probe("Who wrote Faust?", "Goethe"),),
                portability=(Probe("Goethe's play Hamlet is set in", "Denmark"),),
            ),
        ),
    ],
)
def test_every_format_from_json_jsonl_and_iterables(tmp_path, record, expected_format, expected):
    assert detect_format(record) == expected_format
    (tmp_path / "data.json").write_text(json.dumps([record, record]))
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n\n" + json.dumps(record) + "\n")
    assert load_edit_requests(tmp_path / "data.json") == [expected, expected]
    assert load_edit_requests(tmp_path / "data.jsonl", limit=1) == [expected]
    assert load_edit_requests([record], format=expected_format) == [expected]


def test_datasets_dataset_is_a_source():
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list([EASYEDIT, EASYEDIT])
    assert load_edit_requests(dataset)[1].locality == (Probe("BBC Radio, by", "BBC"),)


def test_requests_round_trip_through_their_dict():
    request = load_edit_requests([KNOWEDIT])[0]
    assert EditRequest.from_dict(request.to_dict()) == request


@pytest.mark.parametrize(
    "records, message",
    [
        ([ZSRE, {**ZSRE, "alt": ""}], r"record 1 \(zsre format\): field 'target_new' must be a non-empty string"),
        ([ZSRE, {k: v for k, v in ZSRE.items() if k != "src"}], r"record 1 \(zsre format\): missing field 'src'"),
        (
            [{**EASYEDIT, "locality_ground_truth": ["a", "b"]}],
            r"record 0.*'locality' needs one ground_truth per prompt",
        ),
        (
            [{**KNOWEDIT, "locality": {"R": [{"prompt": "p"}]}}],
            r"record 0.*'locality.R' needs 'prompt' and 'ground_truth'",
        ),
        ([{**KNOWEDIT, "rephrase_prompt": 3}], r"record 0.*'rephrase_prompt' must be a non-empty string"),
        ([{**KNOWEDIT, "locality": ["p"]}], r"record 0.*'locality' must map probe names"),
        (
            [{**ROME, "requested_rewrite": {**ROME["requested_rewrite"], "prompt": "no placeholder"}}],
            r"needs the '\{\}'",
        ),
        ([{**EASYEDIT, "subject": 5}], r"field 'subject' must be a string"),
        ([{**ZSRE, "loc_ans": 7}], r"record 0.*'locality' must hold probes with a non-empty prompt and answer"),
        ([EASYEDIT, "not a record"], r"record 1.*must be JSON objects"),
        ([{"question": "q", "answer": "a"}], r"record 0: unknown record format"),
    ],
)
def test_malformed_records_name_the_record_and_the_field(records, message):
    with pytest.raises(RequestError, match=message):
        load_edit_requests(records)


def test_skip_invalid_leaves_malformed_records_out(caplog):
    requests = load_edit_requests([ZSRE, {**ZSRE, "alt": ""}, ZSRE], skip_invalid=True)
    assert len(requests) == 2 and "record 1" in caplog.text


def test_broken_files_are_refused(tmp_path):
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(RequestError, match="not valid JSON"):
        load_edit_requests(tmp_path / "bad.json")
    (tmp_path / "bad.jsonl").write_text(json.dumps(ZSRE) + "\n{oops\n")
    with pytest.raises(RequestError, match="line 2"):
        load_edit_requests(tmp_path / "bad.jsonl")
    (tmp_path / "object.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(RequestError, match="expected a JSON list"):
        load_edit_requests(tmp_path / "object.json")
    with pytest.raises(FileNotFoundError):
        load_edit_requests(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="Unknown format"):
        load_edit_requests([ZSRE], format="csv")


@pytest.mark.parametrize(
    "name, count",
    [
        ("zsre/zsre_mend_train-1k.json", 998),  # two records have an empty target
        ("zsre/ZsRE-test-all.json", 1304),
        ("counterfact/counterfact-val.json", 1919),
        ("knowedit/wiki_counterfact-train.json", 1425),
        ("knowedit/wikibio-train.json", 464),
    ],
)
def test_the_shared_data_sets_load(name, count):
    path = DATA_DIR / name
    if not path.exists():
        pytest.skip(f"{path} is not available")
    requests = load_edit_requests(path, skip_invalid=True)
    assert len(requests) == count and all(r.prompt and r.target_new for r in requests)
