"""The README and the docs site stay true to the code: the config reference page is what the schema
generates, every dotted config key and every `distrain` flag they name exists, mkdocs.yml's nav lists
exactly the pages under docs/, and the README's links point at files that exist."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DOCS = REPO / "docs"
README = REPO / "README.md"
REFERENCE = DOCS / "reference" / "config.md"
REGENERATE = "python docs/gen_config_reference.py"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
# a fenced block right after this comment is not checked (it shows a mistake on purpose)
SKIP = "<!-- docs-check: skip -->"
SECTIONS = (
    "run",
    "model",
    "data",
    "train",
    "optim",
    "parallel",
    "checkpoint",
    "metrics",
    "tracking",
    "cluster",
)
# `metrics.jsonl`, `train.py`, `model.safetensors` are files, not keys
FILE_EXT = {
    "py",
    "md",
    "yaml",
    "yml",
    "json",
    "jsonl",
    "txt",
    "png",
    "pt",
    "pth",
    "safetensors",
    "sh",
    "sbatch",
    "parquet",
}
KEY = re.compile(
    r"(?<![\w./\-$])((?:" + "|".join(SECTIONS) + r")(?:\.(?:[a-z_][a-z0-9_]*|<[a-z]+>))+(?:\.\*)?)(?![\w\-/])"
)
# flags of other tools the docs name in backticks (their own manuals are the reference)
EXTERNAL_FLAGS = {
    "sbatch": {"--requeue", "--open-mode", "--signal", "--mem", "--exclusive"},
    "torchrun": {"--nproc_per_node", "--nnodes"},
    "pytest": {"--durations", "--strict-markers"},
    "launch/test.sh": {"--all"},
    "mkdocs": {"--strict"},
    "scancel": {"--signal", "--batch"},
}


def pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def code_spans(text: str) -> list[tuple[str, str]]:
    """(kind, text) of every fenced block ("block") and inline code span ("inline") of a markdown page,
    the generated reference left out (test_config_reference_page_is_current covers it)."""
    if START in text:
        text = text[: text.index(START)] + text[text.index(END) :]
    out, rest, pos = [], [], 0
    for m in re.finditer(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", text, re.M | re.S):
        rest.append(text[pos : m.start()])
        pos = m.end()
        if not text[: m.start()].rstrip().endswith(SKIP):
            out.append(("block", m.group(2)))
    rest.append(text[pos:])
    for m in re.finditer(r"(`+)(.+?)\1", "".join(rest), re.S):
        out.append(("inline", m.group(2).strip()))
    return out


def mentioned_keys(text: str) -> set[str]:
    keys = set()
    for _, code in code_spans(text):
        for m in KEY.finditer(code):
            key = m.group(1)
            if key.rsplit(".", 1)[-1] in FILE_EXT:
                continue
            keys.add(key)
    return keys


def key_exists(key: str, known: set[str]) -> bool:
    """``optim.<part>.lr`` matches any part; ``tracking.wandb.*`` any key below the section."""
    wild = key.endswith(".*")
    pattern = re.sub(r"<[a-z]+>", r"[^.]+", re.escape(key[:-2] if wild else key))
    rx = re.compile(pattern + (r"\..+" if wild else ""))
    return any(rx.fullmatch(k) for k in known)


def _cli_parser() -> argparse.ArgumentParser:
    """The `distrain` command's parser, found by what it returns rather than by its name."""
    import distrain.cli as cli

    for name in sorted(dir(cli)):
        fn = getattr(cli, name)
        if callable(fn) and "parser" in name.lower() and not isinstance(fn, type):
            try:
                p = fn()
            except TypeError:
                continue
            if isinstance(p, argparse.ArgumentParser):
                return p
    raise AssertionError("distrain.cli has no function returning the command's ArgumentParser")


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict:
    """{subcommand path: (its option strings, its subcommands)} of every (sub)parser."""
    opts, subs = set(), {}
    for action in parser._actions:
        opts.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            subs = dict(action.choices)
    out = {path: (opts, set(subs))}
    for name, sub in subs.items():
        out.update(_commands(sub, (*path, name)))
    return out


CMD = re.compile(r"(?:^|(?<=[\s;|&(]))(?:[\w./-]*/)?distrain(?:\.cli)?[ \t]+([^\n]*)")


def command_problems(text: str, commands: dict) -> list[str]:
    """Each `distrain ...` command line of a page whose subcommand or flags do not exist."""
    lines = []
    for kind, code in code_spans(text):
        code = code.replace("\\\n", " ")
        for line in code.splitlines():
            line = re.sub(r"(^|\s)#.*", "", line)  # shell comments
            for m in CMD.finditer(line):
                if kind == "inline" and m.start() != 0:
                    continue
                lines.append(m.group(1))
    bad = []
    for args in lines:
        words = re.split(r"\s*(?:\|\||&&|[|;>]).*", args, maxsplit=1)[0].split()
        path: tuple[str, ...] = ()
        while words and words[0] in commands[path][1]:
            path, words = (*path, words[0]), words[1:]
        if words and commands[path][1]:  # a command with subcommands, and the next word is none of them
            bad.append(f"`distrain {args}`: {' '.join(path) or 'distrain'} has no subcommand {words[:1]}")
            continue
        for w in words:
            flag = w.split("=", 1)[0]
            if flag.startswith("--") and flag not in commands[path][0]:
                bad.append(f"`distrain {args}`: `distrain {' '.join(path)}` has no flag {flag}")
    return bad


def flag_problems(text: str, all_flags: set[str]) -> list[str]:
    """Each flag in an inline span of its own (`--dry-run`, `--workers 2`) that no `distrain` command
    and no tool of EXTERNAL_FLAGS has."""
    known = all_flags | set().union(*EXTERNAL_FLAGS.values())
    bad = []
    for kind, code in code_spans(text):
        if kind == "inline" and code.startswith("--"):
            for flag in re.findall(r"(?:^|\s)(--[a-zA-Z][\w-]*)", code):
                if flag not in known:
                    bad.append(f"`{code}`: no distrain command has {flag}")
    return bad


def test_config_reference_page_is_current():
    from distrain.config import reference_markdown

    text = REFERENCE.read_text()
    assert START in text and END in text, f"{REFERENCE} lost its markers; regenerate it: {REGENERATE}"
    block = text[text.index(START) + len(START) : text.index(END)]
    assert block.strip() == reference_markdown().strip(), (
        f"{REFERENCE.relative_to(REPO)} is stale (the config schema changed): regenerate it with `{REGENERATE}`"
    )


def test_every_config_key_named_in_the_docs_exists():
    from distrain.config.loader import config_keys

    known = config_keys()
    missing = {
        f"{page.relative_to(REPO)}: `{key}`"
        for page in pages()
        for key in mentioned_keys(page.read_text())
        if not key_exists(key, known)
    }
    assert not missing, "config keys that do not exist (see `distrain config reference`):\n" + "\n".join(
        sorted(missing)
    )


def test_every_distrain_command_and_flag_named_in_the_docs_exists():
    commands = _commands(_cli_parser())
    all_flags = set().union(*(opts for opts, _ in commands.values()))
    bad = []
    for page in pages():
        text = page.read_text()
        bad += [f"{page.relative_to(REPO)}: {b}" for b in command_problems(text, commands)]
        bad += [f"{page.relative_to(REPO)}: {b}" for b in flag_problems(text, all_flags)]
    assert not bad, "commands or flags that do not exist (see `distrain <command> --help`):\n" + "\n".join(
        bad
    )


def test_the_checks_catch_a_wrong_key_command_and_flag():
    """The three checks above would fail on a page with a mistake (and pass prose and file names)."""
    from distrain.config.loader import config_keys

    known, commands = config_keys(), _commands(_cli_parser())
    all_flags = set().union(*(opts for opts, _ in commands.values()))
    page = (
        "Set `parallel.zero_stag` and `model.n_layer`, see `metrics.jsonl`, `train.py`, `README.md`.\n\n"
        "```bash\ndistrain train configs/gpt-cpu-tiny.yaml data.train_pth=x optim.<part>.lr=1\n"
        "distrain launch local CONFIG --dry-run --wrokers 2\ndistrain trian CONFIG\n```\n\n"
        "Use `--dry-run`, not `--dryrun`.\n"
    )
    keys = mentioned_keys(page)
    assert keys == {"parallel.zero_stag", "model.n_layer", "data.train_pth", "optim.<part>.lr"}
    assert [k for k in sorted(keys) if not key_exists(k, known)] == ["data.train_pth", "parallel.zero_stag"]
    problems = command_problems(page, commands)
    assert len(problems) == 2 and "--wrokers" in problems[0] and "trian" in problems[1], problems
    assert flag_problems(page, all_flags) == ["`--dryrun`: no distrain command has --dryrun"]
    skipped = f"{SKIP}\n```\n$ distrain train CONFIG --bad model.n_layers=3\n```\n"
    assert not mentioned_keys(skipped) and not command_problems(skipped, commands)


def _nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    if isinstance(node, dict):
        return [p for v in node.values() for p in _nav_pages(v)]
    return []


def test_mkdocs_nav_lists_every_page_once():
    conf = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    assert conf["theme"]["name"] == "material"
    nav = _nav_pages(conf["nav"])
    on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert len(nav) == len(set(nav)), f"mkdocs.yml lists a page twice: {nav}"
    assert sorted(nav) == on_disk, (
        f"mkdocs.yml nav and docs/ differ: not in nav {sorted(set(on_disk) - set(nav))}, "
        f"missing files {sorted(set(nav) - set(on_disk))}"
    )


@pytest.mark.parametrize("page", ["README.md"])
def test_readme_links_point_at_files(page):
    text = (REPO / page).read_text()
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t and not t.startswith("#")]
    assert links, "the README links into the docs"
    missing = [t for t in links if not (REPO / t.split("#")[0]).exists()]
    assert not missing, f"{page} links to files that do not exist: {missing}"


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines; move detail into docs/ (at most 200)"
