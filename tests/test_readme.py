"""The README and docs/ say what is true: the Python API example runs as written, every
``python -m diffexp.<entry>`` command shown composes its config, every relative link resolves,
and the README's Layout names the package as it is."""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from diffexp.objectives import expand_sweep
from tests.helpers import CONF, ROOT, compose_config, conf_options

README = ROOT / "README.md"
PACKAGE = ROOT / "diffexp"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

# Hydra entry points and the config each composes
HYDRA_ENTRIES = {
    "train": "train",
    "eval": "eval",
    "sample": "sample",
    "optimize_grid": "optimize_grid",
    "train_classifier": "train_classifier",
    "train_features": "train_features",
}
# argparse entry points: their flags are parsed by the real parser, nothing is computed
ARGPARSE_ENTRIES = ("compare", "objectives")
# What the placeholders of the commands stand for: a value of the kind the text means. A new
# placeholder in the README or docs must be added here (the test says so).
PLACEHOLDERS = {
    "<date_time>": "2024-01-01_00-00-00",
    "<run>": "outputs/train/2024-01-01_00-00-00",
    "<job>": "outputs/multirun/train/2024-01-01_00-00-00/0",
    "$d": "outputs/multirun/train/2024-01-01_00-00-00/0/",
    "<w>": "2",
    "<p>": "partition",
    "<sweep folder>": "outputs/multirun/train/2024-01-01_00-00-00",
}
# bare placeholder arguments: "<objective>" is one row of the table it comes with (its first)
BARE_PLACEHOLDERS = {"<objective>": ["parameterization=eps", "weighting=elbo"]}


def _page(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --- finding the commands --------------------------------------------------------------------


@dataclass
class Command:
    where: str  # file:line
    entry: str  # train, eval, ..., compare, objectives
    args: list[str]


FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", flags=re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")


def _mask(text: str, start: int, end: int) -> str:
    """``text`` with [start, end) blanked, newlines kept (so line numbers stay right)."""
    return text[:start] + re.sub(r"[^\n]", " ", text[start:end]) + text[end:]


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _snippets(text: str) -> list[tuple[int, str, bool]]:
    """(line, text, is shell) for every fenced block, inline code span and indented code block;
    inline spans are one command at most, blocks are shell scripts."""
    found = []
    for m in FENCE.finditer(text):
        if m.group(1) in ("", "bash", "sh", "shell", "console"):
            found.append((_line(text, m.start(2)), m.group(2), True))
        text = _mask(text, m.start(), m.end())
    for m in INLINE.finditer(text):
        found.append((_line(text, m.start(1)), m.group(1), False))
        text = _mask(text, m.start(), m.end())
    lines = text.split("\n")
    i = 0
    while i < len(lines):  # an indented code block: 4 spaces after a blank line
        if lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            found.append((i + 1, "\n".join(s[4:] for s in lines[i:j]), True))
            i = j
        else:
            i += 1
    return found


def _segments(line: int, script: str, shell: bool) -> list[tuple[int, list[str]]]:
    """The simple commands of a snippet as argument lists: comments dropped, backslash
    continuations joined, split at ``;``, ``&&``, ``||``, ``|``."""
    if not shell:
        script = " ".join(script.split())
    out = []
    logical, start = "", line
    for n, raw in enumerate(script.split("\n")):
        if not logical:
            start = line + n
        if raw.rstrip().endswith("\\"):
            logical += raw.rstrip()[:-1] + " "
            continue
        logical += raw
        if "python -m diffexp." in logical or "make train" in logical:
            out.extend((start, args) for args in _split(logical, shell, start))
        logical = ""
    return [(n, args) for n, args in out if args]


def _split(logical: str, shell: bool, line: int) -> list[list[str]]:
    for placeholder, value in PLACEHOLDERS.items():  # those with a space, before splitting
        logical = logical.replace(placeholder, value) if " " in placeholder else logical
    lex = shlex.shlex(logical, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    lex.commenters = "#" if shell else ""
    commands: list[list[str]] = [[]]
    try:
        for tok in lex:
            if set(tok) <= set(";&|"):
                commands.append([])
            else:
                commands[-1].append(tok)
    except ValueError as err:  # unbalanced quotes: the command shown would not run either
        raise ValueError(f"line {line}: cannot split {logical!r}: {err}") from None
    return commands


def _command(where: str, args: list[str]) -> Command | None:
    """A diffexp command from one argument list (``for d in ...; do`` and env assignments
    before ``python`` allowed), or None."""
    for i, tok in enumerate(args[:-2]):
        entry = re.fullmatch(r"diffexp\.(\w+)", args[i + 2])
        if tok == "python" and args[i + 1] == "-m" and entry:
            return Command(where, entry.group(1), args[i + 3 :])
    if args[:2] == ["make", "train"]:
        make_args = [a.removeprefix("ARGS=") for a in args[2:] if a.startswith("ARGS=")]
        return Command(where, "train", [x for a in make_args for x in shlex.split(a)])
    return None


def _commands() -> list[Command]:
    found = []
    for page in PAGES:
        for line, snippet, shell in _snippets(page.read_text()):
            for start, args in _segments(line, snippet, shell):
                cmd = _command(f"{_page(page)}:{start}", args)
                if cmd is not None:
                    found.append(cmd)
    return sorted(found, key=lambda c: (c.where.split(":")[0], int(c.where.split(":")[1])))


COMMANDS = _commands()
HYDRA_COMMANDS = [c for c in COMMANDS if c.entry in HYDRA_ENTRIES]
ARGPARSE_COMMANDS = [c for c in COMMANDS if c.entry in ARGPARSE_ENTRIES]


def _fill(args: list[str]) -> list[str]:
    """Placeholders replaced by values that compose; an unknown placeholder fails."""
    filled = []
    for arg in args:
        if arg in BARE_PLACEHOLDERS:
            filled.extend(BARE_PLACEHOLDERS[arg])
            continue
        for placeholder, value in PLACEHOLDERS.items():
            arg = arg.replace(placeholder, value)
        unknown = re.findall(r"<[^<>=]*>|\$\w+", arg)
        assert not unknown, f"placeholder {unknown} in {arg!r}: add it to PLACEHOLDERS"
        filled.append(arg)
    return filled


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _without_missing_plugins(overrides: list[str]) -> list[str]:
    """The overrides less those of an optional Hydra plugin that is not installed here (the
    SLURM launcher, extra ``[slurm]``): the rest of the command still has to compose."""
    if _installed("hydra_plugins.hydra_submitit_launcher"):
        return overrides
    return [o for o in overrides if not o.startswith(("hydra/launcher=", "hydra.launcher."))]


# --- the tests -------------------------------------------------------------------------------


def test_python_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    exec(compile(blocks[0], "README.md", "exec"), {})


def test_the_command_finder_finds_the_commands():
    """Guards the extractor: it must not silently find nothing."""
    assert len(HYDRA_COMMANDS) >= 40, [c.where for c in HYDRA_COMMANDS]
    assert len(ARGPARSE_COMMANDS) >= 5, [c.where for c in ARGPARSE_COMMANDS]
    assert {"train", "eval", "sample", "train_features"} <= {c.entry for c in HYDRA_COMMANDS}
    assert {c.entry for c in ARGPARSE_COMMANDS} == set(ARGPARSE_ENTRIES)
    assert {c.where.split(":")[0] for c in COMMANDS} >= {"README.md", "docs/ablations.md"}


@pytest.mark.parametrize("cmd", HYDRA_COMMANDS, ids=[c.where for c in HYDRA_COMMANDS])
def test_shown_command_composes(cmd: Command):
    """Each ``python -m diffexp.<entry> ...`` shown composes its config with its overrides
    (a sweep: every combination)."""
    args = _fill(cmd.args)
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    assert not [a for a in overrides if a.startswith("-")], f"unexpected flag in {cmd.args}"
    overrides = _without_missing_plugins(overrides)
    for combo in expand_sweep(overrides) if multirun else [overrides]:
        cfg = compose_config(HYDRA_ENTRIES[cmd.entry], combo)
        assert cfg.task_name == cmd.entry


@pytest.mark.parametrize("cmd", ARGPARSE_COMMANDS, ids=[c.where for c in ARGPARSE_COMMANDS])
def test_shown_argparse_command_parses(cmd: Command, monkeypatch, tmp_path):
    """``compare`` and ``objectives``: the real parser takes the flags shown (their work is
    stubbed out); the overrides ``objectives`` passes on compose the train config."""
    args = _fill(cmd.args)
    if cmd.entry == "compare":
        import diffexp.compare as compare

        calls = []
        table = tmp_path / "comparison.md"
        table.write_text("")

        def fake_compare(paths, out, group_by, columns, baseline=None):
            calls.append((paths, out, group_by, columns, baseline))
            return table

        monkeypatch.setattr(compare, "compare", fake_compare)
        monkeypatch.setattr(sys, "argv", ["python -m diffexp.compare", *args])
        compare.main()
        assert len(calls) == 1
        keys = compare.parse_group_by(calls[0][2])  # refuses a key that is not a choice
        if calls[0][4] is not None:
            compare.parse_baseline(calls[0][4], keys)
    else:
        import diffexp.objectives as objectives

        sets: list[list[str]] = []

        def fake_implied_weightings(override_sets, n_points=401):
            sets.extend(override_sets)
            return []

        monkeypatch.setattr(objectives, "implied_weightings", fake_implied_weightings)
        monkeypatch.setattr(objectives, "table", lambda curves: "")
        monkeypatch.setattr(objectives, "write_report", lambda c, out: (out, out))
        assert objectives.main(args) == 0
        assert sets
        for overrides in sets:
            compose_config("train", overrides)


# --- links -----------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", flags=re.M)


def _prose(text: str) -> str:
    """The text without fenced blocks and inline code (links there are not links)."""
    for m in list(FENCE.finditer(text)):
        text = _mask(text, m.start(), m.end())
    for m in list(INLINE.finditer(text)):
        text = _mask(text, m.start(), m.end())
    return text


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats
    numbered."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _prose(path.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(page: Path) -> list[tuple[int, str]]:
    text = _prose(page.read_text())
    found = [(_line(text, m.start()), m.group(1)) for m in LINK.finditer(text)]
    found += [(_line(text, m.start()), m.group(1)) for m in REFERENCE.finditer(text)]
    return [(n, t) for n, t in found if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", PAGES, ids=[_page(p) for p in PAGES])
def test_relative_links_resolve(page: Path):
    """Every relative link (images too) names a file that exists, and its #anchor a heading."""
    broken = []
    for line, target in _links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{_page(page)}:{line}: {target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{_page(page)}:{line}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in _links(README)}
    assert set(PAGES[1:]) <= linked, sorted(_page(p) for p in set(PAGES[1:]) - linked)


# --- the layout ------------------------------------------------------------------------------

PY = re.compile(r"(?<![\w/.])([A-Za-z_]\w*\.py)\b")
DIR = re.compile(r"(?<![\w/.])([A-Za-z_]\w*/)(?=[\s,)]|$)")


def _layout_block() -> str:
    section = README.read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return FENCE.search(section).group(2)


def _layout_paths() -> tuple[set[str], set[str]]:
    """(the entries of diffexp/ the block names, every path the block names), relative to
    the repository root: a line's own entries first, then the paths its description names,
    inside the line's folder."""
    entries: list[str] = []
    for line in _layout_block().splitlines():
        if line.startswith("    ") and entries:  # a description continued from the line above
            entries[-1] += " " + line.strip()
        elif line.strip():
            entries.append(line)
    top, named = set(), set()
    for line in entries:
        if not line.startswith(" "):  # the repository root: diffexp/, conf/, tests/, ...
            words = line.split()
            roots = words[: next((i for i, w in enumerate(words) if "/" not in w), None)]
            named.update(roots)
            named.update(f"{roots[0]}{m.group(1)}" for m in PY.finditer(line))
            continue
        words = line.split()
        lead = []
        while words and (words[0].endswith(".py") or words[0].endswith("/")):
            lead.append(words.pop(0))
        top.update(f"diffexp/{w}" for w in lead)
        rest = " ".join(words)
        base = f"diffexp/{lead[0]}" if len(lead) == 1 and lead[0].endswith("/") else "diffexp/"
        inner = [m.group(1) for m in PY.finditer(rest)] + [m.group(1) for m in DIR.finditer(rest)]
        named.update(f"{base}{p}" for p in inner)
    return top, named | top


def test_layout_names_every_module_of_each_package():
    """Each package's entry in the Layout block names all of its modules (case aside)."""
    entries: dict[str, str] = {}
    for line in _layout_block().splitlines():
        if line.startswith("  ") and not line.startswith("    "):
            lead = line.split()[0]
            entries[lead] = line
        elif line.startswith("    ") and entries:
            entries[list(entries)[-1]] += " " + line.strip()
    for package in sorted(p.parent for p in PACKAGE.glob("*/__init__.py")):
        text = entries[f"{package.name}/"].lower().replace("_", " ")
        for module in package.rglob("*.py"):
            if module.name != "__init__.py":
                stem = module.stem.lower().replace("_", " ")
                assert stem in text, f"{module.stem} of {package.name}/"


def test_layout_names_the_package():
    top, named = _layout_paths()
    assert len(top) >= 10, top  # the parser found the block's entries
    actual = {f"diffexp/{p.name}" for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    actual |= {f"diffexp/{p.parent.name}/" for p in PACKAGE.glob("*/__init__.py")}
    missing = sorted(actual - top)
    absent = sorted(p for p in named if not (ROOT / p.rstrip("/")).exists())
    assert not missing, f"in diffexp/ but not in the README's Layout: {missing}"
    assert not absent, f"named in the README's Layout but not there: {absent}"


def test_the_config_group_table_lists_every_option_of_conf():
    """Each row of the README's config-group table names exactly the options of its conf/
    folders (rows of several groups separate them with " / ")."""
    section = README.read_text().split("### Config groups", 1)[1].split("\n### ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("| `")]
    checked = set()
    for row in rows:
        groups_cell, options_cell = (c.strip() for c in row.strip("|").split("|")[:2])
        groups = re.findall(r"`([\w/]+)`", groups_cell)
        parts = options_cell.split(" / ") if len(groups) > 1 else [options_cell]
        assert len(parts) == len(groups), row
        for group, part in zip(groups, parts, strict=True):
            options = set(re.findall(r"`(\w+)`", re.sub(r"\(.*?\)", "", part)))
            if group in ("experiment", "hparams_search", "debug"):  # presets: listed in part
                assert options <= set(conf_options(group)), (group, options)
            else:
                assert options == set(conf_options(group)), (group, options)
            checked.add(group)
    groups_in_conf = {
        p.name for p in CONF.iterdir() if p.is_dir() and p.name not in {"hydra", "paths"}
    }
    assert checked == groups_in_conf, groups_in_conf ^ checked
