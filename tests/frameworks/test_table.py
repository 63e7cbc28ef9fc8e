"""Table 2 of the survey as data: every feature either links to a chapter through the catalog or says why the
book does not build it, and the table's rows are the survey's."""

import re
from pathlib import Path

import pytest

from effref.catalog import load_catalog
from effref.frameworks import FEATURES, FRAMEWORKS, feature_links, feature_matrix

ROOT = Path(__file__).resolve().parents[2]
SURVEY = Path("/work/shared/survey/efficient-llms-survey.txt")


def test_every_feature_links_to_an_existing_chapter_or_is_marked_not_built():
    catalog = {e.id: e for e in load_catalog()}
    for row in feature_links(catalog):
        assert row["unknown_ids"] == [], f"{row['feature']}: ids missing from the catalog"
        assert row["frameworks"], f"{row['feature']} is listed by no framework of the table"
        if row["status"] == "built":
            assert row["chapters"] and all((ROOT / c).is_file() for c in row["chapters"])
            assert all(catalog[i].implemented for i in row["catalog ids"])
        else:
            assert row["chapters"] == [] and row["note"], f"{row['feature']}: an unbuilt feature says why"
            assert row["status"] == ("planned" if row["planned ids"] else "not built")


def test_every_feature_of_every_framework_is_described_and_every_described_feature_is_used():
    used = {f for fw in FRAMEWORKS for f in fw.features}
    assert used == set(FEATURES)


def test_the_table_has_the_surveys_fourteen_rows_and_support_columns():
    names = [fw.name for fw in FRAMEWORKS]
    assert names == ["DeepSpeed", "Megatron", "Alpa", "Colossal AI", "FairScale", "Pax", "Composer", "vLLM",
                     "OpenLLM", "Ray LLM", "MLC LLM", "Sax", "Mosec", "LLM Foundry"]
    training = {fw.name for fw in FRAMEWORKS if fw.training}
    assert training == set(names[:7])  # the seven training frameworks; the serving ones only infer
    assert all(fw.inference for fw in FRAMEWORKS)
    assert {fw.name for fw in FRAMEWORKS if fw.finetuning} == set(names[:7]) | {"OpenLLM"}


@pytest.mark.skipif(not SURVEY.exists(), reason="the survey's text is not on this machine")
def test_rows_match_the_surveys_text():
    text = SURVEY.read_text()
    start = text.index("Table 2: Comparison of LLM frameworks.")
    table = text[start:text.index("5 Concluding Remarks")]
    for fw in FRAMEWORKS:
        assert fw.name in table
    # "¥" is a tick, "q" a cross in the extracted text: check the three support columns of every row
    for fw in FRAMEWORKS:
        marks = re.search(re.escape(fw.name) + r" ([¥q]) ([¥q]) ([¥q])", table).groups()
        assert [m == "¥" for m in marks] == [fw.training, fw.finetuning, fw.inference], fw.name


def test_feature_matrix_agrees_with_the_rows():
    frameworks, features, has = feature_matrix()
    assert frameworks == [fw.name for fw in FRAMEWORKS] and sorted(features) == sorted(FEATURES)
    for fw, row in zip(FRAMEWORKS, has):
        assert {f for f, h in zip(features, row) if h} == set(fw.features)
    counts = [sum(r[j] for r in has) for j in range(len(features))]
    assert counts == sorted(counts, reverse=True)
