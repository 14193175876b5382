"""The documentation cannot drift from the code: docs/config.md is what `evoray config
--markdown` renders now, every relative link of README.md and docs/*.md reaches a file (and a
heading, where it names one), and docs/cluster.md shows the README's tested local-head recipe."""

import re
from pathlib import Path

import pytest

from evoray.cli import main
from evoray.config.reference import config_markdown

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(path: Path) -> str:
    """A page without its fenced code blocks (a `# comment` there is not a heading)."""
    return FENCE.sub("", path.read_text())


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to
    hyphens, a repeated one numbered."""
    seen: dict[str, int] = {}
    for title in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", _prose(path), re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def test_config_reference_is_current():
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == config_markdown(), (
        "docs/config.md is stale: run `evoray config --markdown > docs/config.md`")


def test_config_reference_names_every_field():
    import dataclasses
    import typing

    from evoray.config import Config

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                assert f.metadata.get("help"), f"{prefix}{f.name} has no help string"
                yield f"{prefix}{f.name}"

    text = config_markdown()
    names = list(walk(Config, ""))
    assert len(names) > 100
    for name in names:
        assert f"| `{name}` |" in text, name


def test_config_markdown_command(capsys):
    assert main(["config", "--markdown"]) == 0
    assert capsys.readouterr().out == config_markdown()
    assert main(["config", "--markdown", "select.ratio=0.5"]) == 2
    assert "takes no config file or overrides" in capsys.readouterr().err


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_a_file_and_heading(page):
    broken = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in set(_anchors(dest)):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_cluster_guide_shows_the_tested_recipe():
    """docs/cluster.md repeats the README's local-head block, which the slow tier runs
    (tests/jobs/test_readme_local_head.py); the two must stay the same."""
    marker = "<!-- local-head recipe -->"
    readme = (ROOT / "README.md").read_text()
    block = re.match(r"\s*```bash\n.*?\n```", readme.split(marker, 1)[1], re.S)
    assert block, "README.md: no ```bash block after the local-head marker"
    assert block.group(0).strip() in (ROOT / "docs" / "cluster.md").read_text()
