"""The command line's error net, in process through `ps3edge.cli.main`: every failure is one stderr
line and a known exit code, never a traceback - also for errors no command foresees."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import typer

import ps3edge.doctor
from conftest import cli, random_image
from ps3edge.cli import main
from ps3edge.cli.app import ABORTS, EXITS, USAGE_ERRORS, _exception_classes, sigterm_unwinds
from ps3edge.errors import Terminated


class Unforeseen(Exception):
    """An exception type nothing in ps3edge knows about."""


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("PS3EDGE_DEBUG", raising=False)


def run_main(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    return lines[0]


def doctor_raises(monkeypatch, exc: BaseException) -> None:
    def collect():
        raise exc
    monkeypatch.setattr(ps3edge.doctor, "collect", collect)


@pytest.mark.parametrize("exc", [RuntimeError("the device went away"), Unforeseen("a custom\nfailure"),
                                 AttributeError("'NoneType' object has no attribute 'shape'")])
def test_an_unforeseen_error_is_one_line_naming_its_type_and_exit_2(monkeypatch, capsys, exc):
    doctor_raises(monkeypatch, exc)
    code, _, err = run_main(capsys, "doctor")
    line = one_line(err)
    assert code == 2
    assert line.startswith("error: ") and " ".join(str(exc).split()) in line
    assert f"({type(exc).__name__})" in line and "PS3EDGE_DEBUG=1" in line


def test_an_unforeseen_error_without_a_message_still_says_what(monkeypatch, capsys):
    doctor_raises(monkeypatch, Unforeseen())
    code, _, err = run_main(capsys, "doctor")
    assert code == 2 and one_line(err).startswith("error: unexpected error (Unforeseen)")


def test_ps3edge_debug_lets_the_traceback_through(monkeypatch):
    doctor_raises(monkeypatch, Unforeseen("look here"))
    monkeypatch.setenv("PS3EDGE_DEBUG", "1")
    with pytest.raises(Unforeseen, match="look here"):
        main(["doctor"])


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), EOFError()])
def test_ctrl_c_and_end_of_input_are_interrupted_130(monkeypatch, capsys, exc):
    doctor_raises(monkeypatch, exc)
    code, _, err = run_main(capsys, "doctor")
    assert code == 130 and one_line(err) == "interrupted"


def test_sigterm_is_terminated_143(monkeypatch, capsys):
    doctor_raises(monkeypatch, Terminated())
    code, _, err = run_main(capsys, "doctor")
    assert code == 143 and one_line(err) == "terminated"


def test_sigterm_unwinds_only_while_a_command_runs_and_keeps_a_hosts_handler():
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(Terminated):
            with sigterm_unwinds():
                signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL      # afterwards SIGTERM ends the process again
        def hosts(signum, frame):
            pass
        signal.signal(signal.SIGTERM, hosts)
        with sigterm_unwinds():
            assert signal.getsignal(signal.SIGTERM) is hosts             # a host program's handler stays
        assert signal.getsignal(signal.SIGTERM) is hosts
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("exc, code", [(typer.Exit(3), 3), (SystemExit(4), 4), (typer.Exit(), 0)])
def test_exit_and_system_exit_pass_through_with_their_code(monkeypatch, capsys, exc, code):
    doctor_raises(monkeypatch, exc)
    assert run_main(capsys, "doctor") == (code, "", "")


def test_a_usage_error_is_one_line_and_exit_2(capsys):
    code, _, err = run_main(capsys, "doctor", "--bogus")
    assert code == 2 and one_line(err).startswith("error: No such option: --bogus")
    assert "(see 'ps3edge doctor --help')" in err


def test_the_exception_classes_are_looked_up_whatever_typer_is_installed():
    assert _exception_classes("NoSuchExceptionAnywhere") == ()
    assert typer.Exit in EXITS and any(issubclass(typer.BadParameter, c) for c in USAGE_ERRORS)
    for classes in (EXITS, USAGE_ERRORS, ABORTS):
        assert all(isinstance(c, type) and issubclass(c, BaseException) for c in classes)
    if hasattr(typer, "Abort"):
        assert typer.Abort in ABORTS


# --- real inputs that used to end in a traceback ----------------------------------------------

@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "input.png"
    random_image().save(path)
    return path


@pytest.mark.parametrize("flag", ["--out", "--image"])
def test_a_symlink_loop_is_one_line(tmp_path, capsys, image_path, flag):
    loop = tmp_path / "loop.safetensors"
    os.symlink(loop.name, loop)
    paths = {"--image": image_path, "--out": tmp_path / "out.safetensors", flag: loop}
    code, _, err = run_main(capsys, "run", tmp_path / "no-artifact", *[x for kv in paths.items() for x in kv])
    assert code == 2 and one_line(err) == f"error: {flag} {loop} is a symlink loop"


def test_a_symlink_loop_is_one_line_from_the_console_script(tmp_path, image_path):
    loop = tmp_path / "loop.safetensors"
    os.symlink(loop.name, loop)
    result = cli("run", tmp_path / "no-artifact", "--image", image_path, "--out", loop)
    assert result.returncode == 2 and one_line(result.stderr) == f"error: --out {loop} is a symlink loop"


def test_an_npz_named_npy_as_prompt_embedding_is_one_line(tmp_path, capsys, image_path):
    npz = tmp_path / "prompt.npy"
    with open(npz, "wb") as f:
        np.savez(f, embedding=np.ones(64, np.float32))
    code, _, err = run_main(capsys, "run", tmp_path / "no-artifact", "--image", image_path,
                            "--out", tmp_path / "out.safetensors", "--prompt-embedding", npz)
    assert code == 2 and one_line(err) == f"error: {npz} is not a .npy array (it is an .npz archive)"


def test_a_full_disk_while_writing_the_features_is_one_line(artifacts, tmp_path, capsys, monkeypatch, image_path):
    from safetensors import SafetensorError

    import ps3edge.runtime.outputs as outputs

    def save_file(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')
    monkeypatch.setattr(outputs, "save_file", save_file)
    out = tmp_path / "out.safetensors"
    code, _, err = run_main(capsys, "run", artifacts("ps3-tiny"), "--image", image_path, "--out", out,
                            "--num-look-close", "1")
    line = one_line(err)
    assert code == 2 and "No space left on device" in line and "(SafetensorError)" in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
