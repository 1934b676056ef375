"""The documentation is tested: every `ps3edge` command in a ```bash block and every ```python block
of README.md and docs/*.md is run by a test, or is marked as needing what this machine lacks.

How a command line is decided (docs/testing.md says the same for readers):

1. it ends in a mark, `# needs: gpu | tensorrt | checkpoint | serve | ray`: not run here;
2. it is `ps3edge ... --help`: run here, as is `--help` of every command `ps3edge --help` lists;
3. its text is in RUN_HERE: run here verbatim, in a scratch directory holding `art/` (the shared
   ps3-tiny artifact) and `examples/sample.png`, with NUM_LOOK_CLOSE=1 to keep it short;
4. its shape (the command and the set of its flags, values ignored) is in COVERED, which names the
   test that runs that shape; that test must exist, and its source, with the fixtures and helpers
   of its module that it uses, must name the command and every flag of the shape.

Anything else fails, naming the file, line and command, so a command added to the docs without a
test (or a mark) fails here. Python blocks run in order, one namespace per page, in the same
scratch directory, unless their first line is a `# needs:` mark.

Also here: the README's opening commands, its length and command list, the relative links and
anchors of every page, and the layer list of docs/architecture.md against tests/test_layers.py.
"""

from __future__ import annotations

import ast
import linecache
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import clean_env, cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MARKS = ("gpu", "tensorrt", "checkpoint", "serve", "ray")
README_COMMANDS = '```bash\npip install -e ".[dev]" && ps3edge demo\npython -m pytest -q\n```'
README_MAX_LINES = 250

# Command lines of the docs that this file runs itself, verbatim (see `ran` below).
RUN_HERE = (
    "ps3edge run art/ --image examples/sample.png --out f.safetensors --overlay sel.png",
    "ps3edge inspect art/",
    "ps3edge extract art/ --input datasets/4kpro/ --out feats/ --shard-size 256",
    "ps3edge triton-repo art/ --out repo/",
)

# command shape -> the test that runs it. A shape is "COMMAND --flag --flag ..." (flags sorted).
COVERED = {
    "demo": "tests/test_cli.py::test_demo_writes_artifact_features_and_overlay",
    "version": "tests/test_cli.py::test_console_script_and_module_entry_point_agree",
    "export --model --out": "tests/test_cli.py::test_export_writes_manifest_and_stage_files",
    "export --layers --model --out --overwrite --seed":
        "tests/test_cli.py::test_export_refuses_to_overwrite_without_flag_and_replaces_with_it",
    "export --max-batch --model --out": "tests/test_batch.py::test_a_batch_over_the_artifacts_bound_is_refused",
    "inspect --json": "tests/test_cli.py::test_inspect_json_is_the_manifest",
    "inspect --lint": "tests/test_lint.py::test_cli_inspect_lint",
    "inspect --lint --precision": "tests/test_lint.py::test_cli_inspect_lint",
    "inspect --json --lint --trt-version": "tests/test_lint.py::test_cli_inspect_lint",
    "run --backend --image --num-look-close --out": "tests/test_cli.py::test_run_writes_features_prob_and_selection_maps",
    "run --image --out --overlay": "tests/test_batch.py::test_run_with_several_images_writes_a_batch_axis_in_flag_order",
    "run --image --out --prompt-embedding":
        "tests/test_batch.py::test_run_with_several_images_writes_a_batch_axis_in_flag_order",
    "run --image --out --precision": "tests/test_precision.py::test_cli_calibrate_run_and_parity",
    "parity --model --num-look-close": "tests/test_cli.py::test_parity_against_the_official_model_passes",
    "parity --artifacts --batch":
        "tests/test_batch.py::test_parity_batch_checks_each_image_against_the_official_code_and_alone",
    "parity --artifacts --images --precision": "tests/test_precision.py::test_cli_calibrate_run_and_parity",
    "calibrate --precision": "tests/test_artifact.py::test_calibrate_killed_halfway_leaves_nothing_after_the_rerun",
    "calibrate --images --method --samples": "tests/test_precision.py::test_cli_calibrate_run_and_parity",
    "doctor": "tests/test_doctor.py::test_doctor_table",
    "doctor --json": "tests/test_doctor.py::test_doctor_json_describes_this_machine",
    "bench --against --backend --batch --device --dtype --json --markdown --model --num-look-close":
        "tests/test_throughput.py::test_bench_batch_on_cpu_against_official",
    "extract --dtype --fps --input --out": "tests/test_extract.py::test_a_list_of_paths_and_fp16",   # fixture small: --fps
    "chat --media --model-path --text": "tests/test_vila.py::test_chat_cli_json_and_exit_codes",
    "serve-openai --batch-delay-ms --max-batch --num-look-close":
        "tests/test_openai_api.py::test_every_error_is_an_openai_error_object",
    "stream --jsonl --source": "tests/test_stream.py::test_a_udp_stream_from_another_process",
    "stream --jsonl --max-frames --source": "tests/test_stream.py::test_a_udp_stream_from_another_process",
    "stream --loop --out --realtime --shard-size --source":
        "tests/test_stream.py::test_sigterm_with_out_exits_143_and_leaves_only_whole_shards",
    "stream --duration --fps --source":
        "tests/test_stream.py::test_files_as_fast_as_they_decode_and_an_image_folder_at_fps",
    "stream --allow-missing --duration --source":
        "tests/test_stream.py::test_a_source_that_cannot_be_opened_is_one_error_line_or_skipped",
    "stream --rerun --source": "tests/test_stream_rerun.py::test_a_recording_holds_each_frame_its_selection_maps_latency_and_steps",
    "stream --rerun-connect --source": "tests/test_stream_rerun.py::test_rerun_connect_streams_to_a_running_rerun_server",
}


# --- reading the docs ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    path: Path
    line: int                  # of the opening fence
    lang: str
    text: str


@dataclass(frozen=True)
class Command:
    path: Path
    line: int
    text: str                  # the command, from `ps3edge` on, without its comment (shlex-joined)
    args: tuple                # after `ps3edge`
    mark: str | None           # what `# needs:` names

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.text}"

    @property
    def shape(self) -> str:
        return shape_of(self.args)


def shape_of(args) -> str:
    command = next((a for a in args if not a.startswith("-")), "")
    flags = sorted({a.split("=", 1)[0] for a in args if a.startswith("--")})
    return " ".join([command, *flags]).strip()


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, with their language."""
    found, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(`{3,})\s*([\w+-]*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        fence, start, body = m.group(1), i + 1, []
        i += 1
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        found.append(Block(path, start, m.group(2).lower(), "\n".join(body)))
        i += 1
    return found


def split_comment(line: str) -> tuple[str, str]:
    """A shell line -> (code, comment): `#` starts a comment at the line's start or after a blank,
    outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def logical_lines(text: str):
    """(first line number, code, comment) per logical line: `\\` continuations joined, the comment
    of the last physical line kept."""
    pending, first = "", None
    for n, raw in enumerate(text.splitlines()):
        code, comment = split_comment(raw)
        if first is None:
            first = n
        if code.endswith("\\"):
            pending += code[:-1] + " "
            continue
        yield first, pending + code, comment
        pending, first = "", None


def commands_of(block: Block) -> list[Command]:
    """Every `ps3edge ...` invocation of a bash block: at a line's start, after VAR=value
    assignments, or after && ; | &."""
    found = []
    for offset, code, comment in logical_lines(block.text):
        mark = re.match(r"needs:\s*([\w-]+)", comment)
        lexer = shlex.shlex(code, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError as e:
            raise AssertionError(f"{block.path.name}:{block.line + offset + 1}: cannot parse {code!r}: {e}") from None
        segment: list = []
        for token in [*tokens, ";"]:
            if token and set(token) <= set("&|;"):
                while segment and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", segment[0]):
                    segment.pop(0)
                if segment and segment[0] == "ps3edge":
                    found.append(Command(block.path, block.line + offset + 1, shlex.join(segment),
                                         tuple(segment[1:]), mark.group(1) if mark else None))
                segment = []
            else:
                segment.append(token)
    return found


def all_blocks(lang: str) -> list[Block]:
    return [b for page in PAGES for b in blocks(page) if b.lang == lang]


def all_commands() -> list[Command]:
    return [c for b in all_blocks("bash") for c in commands_of(b)]


def python_mark(block: Block) -> str | None:
    first = block.text.lstrip().splitlines()[0] if block.text.strip() else ""
    m = re.match(r"#\s*needs:\s*([\w-]+)", first)
    return m.group(1) if m else None


def decide(command: Command) -> str:
    """'marked', 'help', 'here', 'covered' or 'uncovered'."""
    if command.mark:
        return "marked"
    if "--help" in command.args:
        return "help"
    if command.args in {tuple(shlex.split(line)[1:]) for line in RUN_HERE}:
        return "here"
    if command.shape in COVERED:
        return "covered"
    return "uncovered"


# --- what a named test runs ----------------------------------------------------------------------

def strings_a_test_passes(test_id: str) -> set[str] | None:
    """The string constants of a test function and of the module-level functions (fixtures,
    helpers) and constants it refers to, transitively; None when there is no such test."""
    file, _, name = test_id.partition("::")
    path = ROOT / file
    if not path.is_file():
        return None
    tree = ast.parse(path.read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    constants = {t.id: n for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    if name not in functions:
        return None
    strings, todo, seen = set(), [functions[name]], set()
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for sub in ast.walk(node):
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                strings.add(sub.value)
            referred = sub.id if isinstance(sub, ast.Name) else sub.arg if isinstance(sub, ast.arg) else None
            if referred in functions:
                todo.append(functions[referred])
            if referred in constants:
                todo.append(constants[referred])
    return strings


# --- the checks -----------------------------------------------------------------------------------

def test_readme_opens_with_the_two_commands_and_stays_short():
    text = README.read_text()
    assert text.startswith("# ps3edge\n\n" + README_COMMANDS + "\n"), "README.md must open with its title and the two commands"
    lines = len(text.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"


def test_every_page_says_what_it_covers():
    for page in PAGES[1:]:
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# "), f"{page.name}: no title"
        assert lines[2].startswith("This page covers"), f"{page.name}: its first paragraph should say what it covers"


def test_every_documented_command_is_run_by_a_test_or_marked():
    commands = all_commands()
    assert len(commands) > 40, "the docs parser found too few commands"
    bad_marks = [c.where + f"  (# needs: {c.mark})" for c in commands if c.mark and c.mark not in MARKS]
    assert not bad_marks, f"unknown marks (known: {', '.join(MARKS)}):\n" + "\n".join(bad_marks)
    uncovered = [c.where + f"  (shape '{c.shape}')" for c in commands if decide(c) == "uncovered"]
    assert not uncovered, (
        "documented commands that no test runs: add the shape and the test that runs it to COVERED in "
        "tests/test_docs.py, run it in RUN_HERE, or end the line with `# needs: "
        + " | ".join(MARKS) + "`:\n" + "\n".join(uncovered))


def test_every_python_block_runs_here_or_is_marked():
    python = all_blocks("python")
    assert python, "the docs parser found no python blocks"
    bad = [f"{b.path.relative_to(ROOT)}:{b.line}" for b in python if python_mark(b) not in (None, *MARKS)]
    assert not bad, f"python blocks with an unknown mark: {bad}"


def test_the_covered_table_names_real_tests_that_run_each_shape():
    used = {c.shape for c in all_commands() if decide(c) == "covered"}
    stale = sorted(set(COVERED) - used)
    assert not stale, f"COVERED entries no documented command has any more: {stale}"
    problems = []
    for shape, test_id in COVERED.items():
        strings = strings_a_test_passes(test_id)
        if strings is None:
            problems.append(f"{shape}: {test_id} does not exist")
            continue
        missing = [word for word in shape.split() if word not in strings]
        if missing:
            problems.append(f"{shape}: {test_id} never passes {missing}")
    assert not problems, "\n".join(problems)


def help_commands() -> list[str]:
    """The commands `ps3edge --help` lists."""
    result = cli("--help")
    assert result.returncode == 0, result.stderr
    listing = result.stdout[result.stdout.index("Commands"):]
    return re.findall(r"^│ ([a-z][a-z-]*)\s{2,}", listing, flags=re.M)


def test_help_of_every_command_and_the_readme_lists_them_all():
    commands = help_commands()
    assert {"run", "export", "inspect", "demo"} <= set(commands), commands
    documented = {c.args for c in all_commands() if decide(c) == "help"}
    for args in sorted(documented | {(name, "--help") for name in commands}):
        result = cli(*args)
        assert result.returncode == 0 and "Usage: ps3edge" in result.stdout, (args, result.stderr)
    readme = README.read_text()
    listed = readme[readme.index("## Commands"):readme.index("## What runs where")]
    missing = [name for name in commands if f"`ps3edge {name}`" not in listed]
    assert not missing, f"README.md's command list lacks {missing}"


# --- run here: the quick start, extract, triton-repo, the python blocks ---------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory, artifacts) -> Path:
    """A scratch directory as the docs assume one: art/ (the shared ps3-tiny artifact, read-only:
    nothing here writes into it), examples/sample.png, datasets/4kpro/ with one image."""
    d = tmp_path_factory.mktemp("docs")
    (d / "art").symlink_to(artifacts("ps3-tiny"), target_is_directory=True)
    (d / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "sample.png", d / "examples" / "sample.png")
    (d / "datasets" / "4kpro").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "sample.png", d / "datasets" / "4kpro" / "sample.png")
    return d


@pytest.fixture(scope="module")
def ran(workdir) -> dict:
    """Every RUN_HERE line that the docs hold, run verbatim in workdir with NUM_LOOK_CLOSE=1."""
    documented = {c.args for c in all_commands() if decide(c) == "here"}
    results = {}
    for line in RUN_HERE:
        args = tuple(shlex.split(line)[1:])
        assert args in documented, f"RUN_HERE names a command no page holds any more: {line}"
        results[line] = cli(*args, cwd=workdir, env=clean_env(NUM_LOOK_CLOSE="1"))
    return results


def test_the_commands_run_here_succeed(ran, workdir):
    for line, result in ran.items():
        assert result.returncode == 0 and "Traceback" not in result.stderr, f"{line}\n{result.stderr}"
    assert (workdir / "f.safetensors").is_file() and (workdir / "sel.png").is_file()
    assert "all sha256 match the manifest" in ran["ps3edge inspect art/"].stdout
    assert (workdir / "feats" / "shard-00000.safetensors").is_file()
    assert (workdir / "repo" / "ps3" / "config.pbtxt").is_file()


PYTHON_PAGES = sorted({b.path for b in all_blocks("python")}, key=lambda p: p.name)


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=lambda p: p.name)
def test_python_blocks_run(page, ran, workdir, monkeypatch):
    """A page's unmarked python blocks, in order, in one namespace, in workdir (after the commands
    run here, so that extract's shards are there)."""
    monkeypatch.chdir(workdir)
    saved_env = dict(os.environ)
    namespace: dict = {"__name__": "__docs__"}
    try:
        for block in blocks(page):
            if block.lang == "python" and python_mark(block) is None:
                name = f"{page.relative_to(ROOT)}:{block.line}"
                linecache.cache[name] = (len(block.text), None, block.text.splitlines(True), name)  # tracebacks
                code = compile(block.text, name, "exec")
                exec(code, namespace)          # noqa: S102 - the docs' own snippets
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    if page == README:                      # what the README's comments claim
        result, results = namespace["result"], namespace["results"]
        assert result.features.shape == (1, 729 + 2916 + 11664, 64) and result.features.dtype.name == "float32"
        assert result.prob.shape == (27, 27)
        assert {s: m.shape for s, m in result.selection_maps.items()} == {756: (54, 54), 1512: (108, 108)}
        assert result.tokens_each_scale == {"lowres": 729, "756": 2916, "1512": 11664}
        assert len(results) == 2 and results[0].tokens_each_scale == {"lowres": 729, "756": 1024, "1512": 4096}


# --- links and the layer list ----------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text, found = path.read_text(), set()
    fenced = {n for b in blocks(path) for n in range(b.line, b.line + len(b.text.splitlines()) + 1)}
    for n, line in enumerate(text.splitlines()):
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m and n not in fenced:
            found.add(slug(m.group(1)))
    return found


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        text = page.read_text()
        for block in blocks(page):             # links inside code blocks are not links
            text = text.replace(block.text, "")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_layout_names_every_layer_of_test_layers():
    import test_layers

    page = ROOT / "docs" / "architecture.md"
    text = page.read_text()
    layout = next(b for b in blocks(page) if b.line > text[:text.index("## Layout")].count("\n"))
    layers: dict[int, str] = {}
    current = None
    for line in layout.text.splitlines():
        m = re.match(r"^\s*(\d+)\s", line)
        if m:
            current = int(m.group(1))
        layers[current] = layers.get(current, "") + " " + line
    wrong = []
    entries = [*test_layers.LAYERS, *([test_layers.FACADE] if hasattr(test_layers, "FACADE") else [])]
    for prefix, rank in entries:
        relative = prefix.split(".")[1:]
        if not relative:
            name = "ps3edge/__init__.py"
        else:
            base = ROOT.joinpath("ps3edge", *relative)
            name = "/".join(relative) + ("/" if base.is_dir() else ".py")
        if name not in layers.get(rank, ""):
            wrong.append(f"{prefix} (layer {rank}): '{name}' is not in layer {rank} of docs/architecture.md's layout")
    assert not wrong, "\n".join(wrong)
