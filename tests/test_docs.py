"""The commands of README.md and docs/*.md parse, their Python examples run, and the README's headline
figures are BENCHMARKS.md's."""

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
# programs a README line may start with that are not navit-clip's to parse
EXTERNAL = {"pip", "tensorboard"}


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def readme_commands() -> list[list[str]]:
    """Every command line of the bash blocks of the README and the docs pages, continuations joined,
    comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", "\n".join(DOCS.values()), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def _train_config(argv: list[str]) -> None:
    """train_clip.py's own parsing and the config it would load (a file the reader supplies, named in
    the line, may not exist here: the line still parses)."""
    from navit_clip.config import load_config

    config, overrides = _module(ROOT / "train_clip.py").parse(argv)
    try:
        load_config(ROOT / config if not Path(config).is_absolute() else config, overrides)
    except ValueError as e:
        assert "does not exist" in str(e), (argv, e)


@pytest.mark.parametrize("words", readme_commands(), ids=lambda w: " ".join(w)[:60])
def test_every_readme_command_parses(words):
    from navit_clip.cli import build_parser

    if words[0] in EXTERNAL or words[:3] == ["python", "-m", "pytest"]:
        return
    if words[:2] == ["python", "-c"]:
        compile(words[2], "README.md", "exec")
        return
    if words[0] == "navit-clip":
        build_parser().parse_args(words[1:])
        return
    if words[0] == "torchrun":
        words = words[next(i for i, w in enumerate(words) if w.endswith(".py") or w == "-m") :]
        if words[0] == "-m":
            assert words[1] == "navit_clip.cli"
            build_parser().parse_args(words[2:])
            return
        words = ["python", *words]
    assert words[0] == "python", f"a README command no test knows how to check: {words}"
    script = ROOT / words[1]
    assert script.is_file(), f"README names {words[1]}, which does not exist"
    if script.name == "train_clip.py":
        _train_config(words[2:])


def test_readme_python_examples_run():
    """The tower and loss examples of every page (the VLM example runs in tests/test_export.py, on an
    export)."""
    ran = 0
    for name, text in DOCS.items():
        scope = {}
        for code in re.findall(r"```python\n(.*?)```", text, re.S):
            if "LlamaForCausalLM" in code:
                continue
            if "from navit_clip.packing" not in code:  # the packing example goes on from the tower's
                scope = {}
            exec(compile(code, name, "exec"), scope)
            ran += 1
    assert ran >= 3


def test_the_readme_is_a_newcomers_page():
    """At most 250 lines, the set-up commands in its first 30, a link to every docs page, and no
    figure outside the generated headline table (docs pages state none either)."""
    lines = README.splitlines()
    assert len(lines) <= 250
    assert 'pip install -e ".[dev]"' in "\n".join(lines[:30]) and "python train_clip.py" in "\n".join(
        lines[:30]
    )
    for page in (ROOT / "docs").glob("*.md"):
        assert f"](docs/{page.name})" in README, page.name
    table = re.search(r"<!-- headline -->.*<!-- /headline -->", README, re.S).group(0)
    outside = README.replace(table, "")
    for name, text in {"README.md": outside, **{k: v for k, v in DOCS.items() if k != "README.md"}}.items():
        assert not re.search(r"\d+(\.\d+)? ?%|\d\.\d+x\b", text), f"{name} states a figure"


def test_headline_figures_are_benchmarks_md_s():
    """README.md's headline table is the one bench/report.py writes from BENCHMARKS.md's pasted
    outputs: a figure cannot be edited by hand or drift (python bench/report.py --headline)."""
    report = _module(ROOT / "bench" / "report.py")
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    table = report.headline(benchmarks)
    assert table in README
    assert table in benchmarks


def test_config_headers_state_no_figures():
    """Config headers point at BENCHMARKS.md for expected results instead of quoting them."""
    for path in (ROOT / "configs").glob("*.yaml"):
        header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
        assert not re.search(r"\d+(\.\d+)?\s?%", header), f"{path.name} quotes a percentage in its header"
