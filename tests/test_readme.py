"""Every flag and path the README (and the docs pages) show exists: each command's flags against the parser of
the script it runs, each `--flag` named in the text against the trainer's (or a script's) flags, each link
and preset path against the repository."""

import re
import shlex
from pathlib import Path

import pytest

from test_inference_scripts import _parser_of

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SCRIPT = re.compile(r"^(?:\S*/)?((?:scripts|benchmarks|configs)/\w+\.py)$")


def _shell_blocks(text: str) -> list[str]:
    """The fenced code blocks marked bash/sh/shell (or unmarked)."""
    blocks, current = [], None
    for line in text.splitlines():
        fence = re.match(r"^\s*```\s*(\w*)", line)
        if fence and current is None:
            current = [] if fence.group(1) in ("", "bash", "sh", "shell") else False
        elif fence:
            if current is not False:
                blocks.append("\n".join(current))
            current = None
        elif current not in (None, False):
            current.append(line)
    return blocks


def _commands(text: str) -> list[list[str]]:
    """Shell commands of the fenced code blocks: continuation lines joined, `&&` chains split."""
    commands = []
    for block in _shell_blocks(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands += [shlex.split(part) for part in line.split("&&") if part.strip()]
    return commands


def _script_calls(command: list[str]):
    """(script path, its own argv, argv after `--` for the trainer) of a command running one of our scripts."""
    for index, token in enumerate(command):
        match = SCRIPT.match(token)
        if match:
            own = command[index + 1:]
            if "--" in own:
                return match.group(1), own[: own.index("--")], own[own.index("--") + 1:], command[:index]
            return match.group(1), own, [], command[:index]
    return None


def _flags(argv: list[str]) -> list[str]:
    return [token.split("=", 1)[0] for token in argv if token.startswith("--")]


def _options(script: str, monkeypatch) -> set[str]:
    if script == "configs/generate_presets.py":
        return {"--check"}
    parser = _parser_of(Path(script).stem if script.startswith("scripts/") else script, monkeypatch)
    return set(parser._option_string_actions)


def _accelerate_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return set(launch_command_parser()._option_string_actions)


def test_the_pages_show_commands_to_check():
    commands = [c for page in PAGES for c in _commands(page.read_text())]
    assert sum(_script_calls(c) is not None for c in commands) >= 15


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_flag_exists(page, monkeypatch):
    unknown = []
    accelerate = _accelerate_options()
    for command in _commands(page.read_text()):
        call = _script_calls(command)
        if call is None:
            continue
        script, own, passthrough, before = call
        if "launch" in before:
            unknown += [f"accelerate {flag}" for flag in _flags(before[before.index("launch") + 1:])
                        if flag not in accelerate]
        known = _options(script, monkeypatch)
        unknown += [f"{script} {flag}" for flag in _flags(own) if flag not in known]
        if passthrough:
            trainer = _options("scripts/train_cps.py", monkeypatch)
            unknown += [f"{script} -- {flag}" for flag in _flags(passthrough) if flag not in trainer]
        for token in own + passthrough:  # presets and files the command names
            if re.match(r"^configs/[\w.-]+\.yaml$", token):
                assert (ROOT / token).is_file(), f"{page.name}: {token} does not exist"
    assert not unknown, f"{page.name} shows flags that do not exist: {unknown}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_flag_named_in_the_text_exists(page, monkeypatch):
    """`--flag` in inline code (e.g. `--cps_on_labeled false`) must be a flag of the trainer or of a script."""
    known = set(_accelerate_options()) | {"--help", "--debug"}
    for path in [*sorted((ROOT / "scripts").glob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py"))]:
        known |= _options(str(path.relative_to(ROOT)), monkeypatch)
    prose = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    named = {match for code in re.findall(r"`([^`]+)`", prose) for match in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", code)}
    assert not sorted(named - known), f"{page.name} names flags that exist nowhere: {sorted(named - known)}"


def _home_of(summary: Path) -> Path:
    """A study's summary.md links from the page that holds it between markers (the README or docs/study.md)."""
    begin = summary.read_text().splitlines()[0]
    homes = [page for page in PAGES if page != summary and begin in page.read_text()]
    assert len(homes) == 1, f"{summary}: its block should be in exactly one page, found in {homes}"
    return homes[0].parent


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_named_path_is_inside_the_repository_and_exists(page):
    text = page.read_text()
    base = _home_of(page) if page.name == "summary.md" else page.parent
    broken = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        resolved = (base / target).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(target)
    for target in re.findall(r"`((?:\.\./)+[\w./-]+)`", text):  # a path outside the clone is dead for a user
        broken.append(target)
    assert not broken, f"{page.name}: links or paths that a clone does not have: {broken}"
