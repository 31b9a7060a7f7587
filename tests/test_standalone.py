"""The repository stands alone: nothing in it points beside the clone, and its data is inside it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from sieve.quality.datasets import load_clinc150, load_davidson, load_openai_moderation
from sieve.settings import Settings

REPO = Path(__file__).resolve().parents[1]

# Built from pieces, so that this file does not contain what it looks for.
FORBIDDEN = ("../" + "shared", "FACTS" + ".md")


def repository_files() -> list[str]:
    """What git tracks, and what it would add (new files not ignored), as paths from the root."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode("utf-8")
    return sorted({name for name in listing.split("\0") if name})


def mentions(data: bytes) -> list[str]:
    """The forbidden strings a text file mentions (a file with a NUL byte is binary: none)."""
    if b"\0" in data:
        return []
    text = data.decode("utf-8", errors="replace")
    return [needle for needle in FORBIDDEN if needle in text]


def test_the_check_finds_what_it_looks_for() -> None:
    assert mentions(b"see " + FORBIDDEN[0].encode() + b"/datasets") == [FORBIDDEN[0]]
    assert mentions(b"as " + FORBIDDEN[1].encode() + b" says") == [FORBIDDEN[1]]
    assert mentions(b"nothing here") == []
    assert mentions(b"\0binary " + FORBIDDEN[0].encode()) == []


def test_no_repository_file_mentions_what_lies_beside_the_clone() -> None:
    files = repository_files()
    assert "tests/test_standalone.py" in files and "workers/sieve/settings.py" in files
    offenders = []
    for name in files:
        path = REPO / name
        if path.is_symlink() or not path.is_file():  # deleted in the working tree, or a link
            continue
        found = mentions(path.read_bytes())
        if found:
            offenders.append(f"{name}: {', '.join(found)}")
    assert offenders == [], "the repository must stand alone:\n" + "\n".join(offenders)


def test_default_datasets_dir_is_the_repositorys_data_folder() -> None:
    default = Settings.model_fields["datasets_dir"].default
    assert isinstance(default, Path) and not default.is_absolute(), "relative, like the other paths"
    folder = (REPO / default).resolve()
    assert folder.is_relative_to(REPO) and folder == REPO / "data"
    assert "data" in (Settings.model_fields["datasets_dir"].description or "")


def test_the_data_folder_holds_the_data_sets_with_their_licences() -> None:
    folder = REPO / Settings.model_fields["datasets_dir"].default
    moderation = load_openai_moderation(folder)
    clinc = load_clinc150(folder)
    davidson = load_davidson(folder)
    assert len(moderation.examples) == 1680
    assert sum(example.outcome == "violating" for example in moderation.examples) == 522
    assert len(clinc.examples) == 15_000 + 3_000 + 4_500 + 100 + 100 + 1_000
    assert (folder / "openai-moderation" / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    assert "Attribution 3.0" in (folder / "clinc150" / "LICENSE").read_text(encoding="utf-8")
    assert len(davidson.examples) == 24_783
    davidson_licence = (folder / "davidson" / "LICENSE").read_text(encoding="utf-8")
    assert davidson_licence.startswith("MIT License") and "Tom Davidson" in davidson_licence
    tracked = repository_files()
    for name in ("openai-moderation/samples-1680.jsonl.gz", "clinc150/data_full.json",
                 "davidson/labeled_data.csv", "openai-moderation/LICENSE", "clinc150/LICENSE",
                 "davidson/LICENSE"):
        assert f"data/{name}" in tracked, f"data/{name} must be in the repository (not ignored)"
    readme = (folder / "README.md").read_text(encoding="utf-8")
    for data in (moderation, clinc, davidson):
        assert data.source in readme, f"data/README.md must cite {data.name}'s source"
        assert data.licence in readme
