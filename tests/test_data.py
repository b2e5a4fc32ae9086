import json

import pytest

from decoding.errors import FusemtError
from runners.data import SAMPLE_PATH, DatasetConfig, load_segments

WMT24 = [
    {"id": 0, "doc_id": "canary", "domain": "canary", "source": "CANARY GUID x", "reference": "CANARY GUID x"},
    {"id": 1, "doc_id": "d1", "domain": "news", "source": "One.", "reference": "一。"},
    {"id": 2, "doc_id": "d1", "domain": "news", "source": "Two.", "reference": "二。"},
    {"id": 3, "doc_id": "d2", "domain": "social", "source": "Three.", "reference": "三。"},
    {"id": 4, "doc_id": "d3", "domain": "literary", "source": "Four.", "reference": "四。"},
]
WMT24PP = [
    {"lp": "en-ja_JP", "domain": "canary", "document_id": "canary", "segment_id": 0, "is_bad_source": True,
     "source": "CANARY", "target": "CANARY", "original_target": "CANARY"},
    {"lp": "en-ja_JP", "domain": "news", "document_id": "d1", "segment_id": 1, "is_bad_source": False,
     "source": "One.", "target": "いち。", "original_target": "一。"},
    {"lp": "en-ja_JP", "domain": "news", "document_id": "d1", "segment_id": 2, "is_bad_source": True,
     "source": "Bad.", "target": "悪い。", "original_target": "悪い。"},
    {"lp": "en-ja_JP", "domain": "social", "document_id": "d2", "segment_id": 3, "is_bad_source": False,
     "source": "Three.", "target": "さん。", "original_target": "三。"},
]


def write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_official_wmt24_layout_drops_canary(tmp_path):
    segs = load_segments(DatasetConfig(name="wmt24_en_ja", path=write(tmp_path, WMT24)))
    assert [s.id for s in segs] == ["1", "2", "3", "4"]
    assert [s.row for s in segs] == [1, 2, 3, 4]
    assert segs[0].reference == "一。" and segs[0].doc_id == "d1"


def test_wmt24pp_layout_drops_bad_sources_and_picks_reference(tmp_path):
    path = write(tmp_path, WMT24PP)
    segs = load_segments(DatasetConfig(name="wmt24_en_ja", path=path))
    assert [(s.id, s.reference) for s in segs] == [("1", "いち。"), ("3", "さん。")]
    original = load_segments(DatasetConfig(name="wmt24_en_ja", path=path, reference_field="original_target"))
    assert [s.reference for s in original] == ["一。", "三。"]


def test_limit_shard_and_domain(tmp_path):
    path = write(tmp_path, WMT24)
    assert [s.id for s in load_segments(DatasetConfig(path=path, limit=2))] == ["1", "2"]
    assert [s.id for s in load_segments(DatasetConfig(path=path, shard="1/2"))] == ["2", "4"]
    assert [s.id for s in load_segments(DatasetConfig(path=path, domains=["news"]))] == ["1", "2"]
    shards = [s.id for i in range(3) for s in load_segments(DatasetConfig(path=path, shard=f"{i}/3"))]
    assert sorted(shards) == ["1", "2", "3", "4"]  # shards partition the data


def test_bundled_sample():
    segs = load_segments(DatasetConfig())
    assert 30 <= len(segs) <= 60 and SAMPLE_PATH.exists()
    assert all(s.source and s.reference for s in segs)


@pytest.mark.parametrize("cfg, message", [
    (DatasetConfig(path="/nonexistent/file.jsonl"), "not found"),
    (DatasetConfig(shard="3/2"), "need 0 <= i < n"),
    (DatasetConfig(shard="half"), "is not 'i/n'"),
    (DatasetConfig(domains=["nope"]), "selects no segments"),
])
def test_bad_dataset_options_are_one_line_errors(cfg, message):
    with pytest.raises(FusemtError, match=message) as err:
        load_segments(cfg)
    assert "\n" not in str(err.value)


def test_hub_dataset_offline_says_how_to_use_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FusemtError, match="dataset.path="):
        load_segments(DatasetConfig(name="wmt24_en_ja", hub_id="google/wmt24pp-not-cached-here", hub_config="en-ja_JP"))


def test_ids_file_selects_in_its_order_and_rejects_unknown_ids(tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("# a comment\nsample-003\n\nsample-001  # trailing comment\n")
    cfg = DatasetConfig(path=str(SAMPLE_PATH), ids_file=str(ids))
    assert [s.id for s in load_segments(cfg)] == ["sample-003", "sample-001"]
    ids.write_text("sample-001\nnope\n")
    with pytest.raises(FusemtError, match="1 id\\(s\\) not in dataset .* \\(first: nope\\)"):
        load_segments(cfg)
    ids.write_text("sample-001\nsample-001\n")
    with pytest.raises(FusemtError, match="lists an id twice"):
        load_segments(cfg)
    with pytest.raises(FusemtError, match="not found"):
        load_segments(DatasetConfig(path=str(SAMPLE_PATH), ids_file=str(tmp_path / "none.txt")))


def test_the_shipped_slices_are_disjoint_and_stratified():
    from pathlib import Path

    from runners.data import read_ids_file

    folder = Path(__file__).resolve().parent.parent / "experiments" / "wmt24pp_en_ja"
    dev, test = read_ids_file(folder / "dev_ids.txt"), read_ids_file(folder / "test_ids.txt")
    assert not set(dev) & set(test) and (len(dev), len(test)) == (25, 24)
