"""One home per fact: docs/configuration.md's tables come from the Settings model,
deploy/worker.toml shows every setting with its default, the README stays short, and
every relative link in the README and docs/ leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llm_router.worker.settings import ModelConfig, Settings
from llm_router_testing import configdoc

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_MAX_LINES = 200
#: Pages whose links are checked, and whose headings links may point at.
PAGES = sorted([README, ROOT / "deploy" / "README.md", *(ROOT / "docs").glob("*.md")])

TOML = configdoc.WORKER_TOML.read_text(encoding="utf-8")


# --- docs/configuration.md ---------------------------------------------------------


def test_configuration_doc_is_current() -> None:
    assert not configdoc.stale(), (
        "docs/configuration.md is stale: run `python -m llm_router_testing.configdoc`"
    )


@pytest.mark.parametrize(
    ("model", "name"),
    [(Settings, n) for n in Settings.model_fields]
    + [(ModelConfig, n) for n in ModelConfig.model_fields],
)
def test_every_field_says_what_it_means(model: type[Settings | ModelConfig], name: str) -> None:
    description = model.model_fields[name].description
    assert description, f"{model.__name__}.{name}: add description= to its Field"


def test_every_setting_and_model_field_has_a_row() -> None:
    text = configdoc.CONFIG_DOC.read_text(encoding="utf-8")
    for name in Settings.model_fields:
        assert f"| `{name}` | `{configdoc.env_name(name)}` |" in text
    for name in ModelConfig.model_fields:
        assert f"| `{name}` |" in text


def test_update_renders_between_the_markers_and_keeps_the_prose() -> None:
    text = "".join(
        f"Prose before {name}.\n<!-- {name}:begin -->\nold table\n<!-- {name}:end -->\nAfter.\n"
        for name in configdoc.SECTIONS
    )
    updated = configdoc.update(text)
    assert "old table" not in updated
    for name, render in configdoc.SECTIONS.items():
        assert f"Prose before {name}.\n<!-- {name}:begin -->\n{render()}\n<!-- {name}:end -->" in (
            updated
        )
    assert configdoc.update(updated) == updated


def test_update_refuses_a_page_without_markers() -> None:
    with pytest.raises(ValueError, match="settings:begin"):
        configdoc.update("# Configuration\n\nno tables here\n")


def test_the_command_writes_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc, toml = tmp_path / "configuration.md", tmp_path / "worker.toml"
    doc.write_text(configdoc.CONFIG_DOC.read_text(encoding="utf-8"), encoding="utf-8")
    toml.write_text(TOML, encoding="utf-8")
    paths = ["--doc", str(doc), "--toml", str(toml)]
    assert configdoc.main(["--check", *paths]) == 0

    stale = doc.read_text(encoding="utf-8").replace("| `max_jobs` |", "| `max_job` |")
    doc.write_text(stale, encoding="utf-8")
    assert configdoc.main(["--check", *paths]) == 1
    assert "stale" in capsys.readouterr().out
    assert configdoc.main(paths) == 0  # writes the tables again
    assert configdoc.main(["--check", *paths]) == 0

    toml.write_text(TOML.replace("budget_wait = 10\n", ""), encoding="utf-8")
    assert configdoc.main(["--check", *paths]) == 1
    assert "budget_wait" in capsys.readouterr().out


# --- deploy/worker.toml --------------------------------------------------------------


def test_worker_toml_shows_every_setting_with_its_default() -> None:
    assert configdoc.worker_toml_problems() == []


def test_the_check_reads_the_file_not_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_ROUTER_MAX_JOBS", "5")
    assert configdoc.toml_problems(TOML) == []


def _without(text: str, old: str) -> str:
    assert old in text, old
    return text.replace(old, "", 1)


def _with(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (_without(TOML, "budget_wait = 10\n"), "setting budget_wait is missing"),
        (_without(TOML, "# metrics_port = 9101\n"), "setting metrics_port is missing"),
        (_with(TOML, "\nkeep_alive = -1\n", "\n"), None),  # still listed in the comment block
        (
            _with(TOML, "#   context_window", "#   context_windw"),
            "model field context_window is missing",
        ),
        (_with(TOML, "#   context_window", "#   contexts"), "lists contexts, which is no model"),
        (_with(TOML, "\nmax_jobs = 10\n", "\nmax_jobs = 12\n"), "max_jobs = 12 is not the default"),
        (_with(TOML, '"nie wiem",', '"nie wim",'), "refusal_patterns[0]"),
        (
            _with(TOML, 'api_base = "http://localhost:11434"\n', ""),
            "chains.default[0].api_base",
        ),
        (_with(TOML, "\ntimeout = 8\n", "\ntimeout = 9\n"), "chains.default[0].timeout = 9"),
        (_with(TOML, "\nmax_jobs = 10\n", "\nmax_jobz = 10\n"), "not valid settings: max_jobz"),
        (_with(TOML, "\nmax_jobs = 10\n", "\nmax_jobs = 0\n"), "not valid settings: max_jobs"),
        (TOML + "\n[[chains.extra]]\nmodel = 'a/b'\ntimeout = 1\n", None),  # chains may be added
    ],
)
def test_the_check_finds(text: str, problem: str | None) -> None:
    problems = configdoc.toml_problems(text)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


def test_a_value_marked_as_not_the_default_is_allowed() -> None:
    marked = _with(
        TOML,
        "\nmax_jobs = 10\n",
        "\n# Fewer jobs on this small machine: not the default.\nmax_jobs = 4\n",
    )
    assert configdoc.toml_problems(marked) == []


# --- README and links ----------------------------------------------------------------


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, at most {README_MAX_LINES}: move detail into docs/"
    )


_FENCE = re.compile(r"^(```|~~~)")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code taken out."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`[^`]*`", "", line))
    return out


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        heading = _HEADING.match(line)
        if heading and not fenced:
            base = slug(heading.group(1))
            name, n = base, 0
            while name in found:
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        for target in _LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path_part, _, fragment = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            if not resolved.exists():
                broken.append(f"{target}: no such file")
            elif fragment and resolved in PAGES and fragment not in anchors(resolved):
                broken.append(f"{target}: no heading #{fragment} in {resolved.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(page: Path) -> None:
    assert broken_links(page) == []


def test_the_link_check_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n[ok](#title) [gone](missing.md) [web](https://example.invalid/x)\n"
        "```\n[in code](nowhere.md)\n```\n`[inline](nowhere.md)`\n",
        encoding="utf-8",
    )
    assert broken_links(page) == ["missing.md: no such file"]


def test_slugs_follow_github() -> None:
    assert slug("What is arq's, and what is ours") == "what-is-arqs-and-what-is-ours"
    assert slug("The `llm-router` command") == "the-llm-router-command"
    assert slug("5. When something goes wrong") == "5-when-something-goes-wrong"
    assert slug("Quick start — two commands") == "quick-start--two-commands"
