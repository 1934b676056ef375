"""VILA-HD questions on a stream (`ps3edge stream --ask / --alert`, `ps3edge.stream(ask=...)`), on the
vila-hd-tiny artifact (random weights: the answers are gibberish, and deterministic): an answer
about a frame equals `VilaPipeline.answer` on that same decoded frame; alerts are reported as the
rule says (a scripted sequence of answers, and a real run); due rounds that pass while an answer
runs are skipped and counted, never queued; the refusals are one `error:` line and exit 2, before
any source opens. Every run is bounded by --max-frames / max_frames and --duration."""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest

from conftest import cli
from stream_support import make_folder, records

pytest.importorskip("av", reason="PyAV (the extract extra) decodes the streams")

STEPS = ("--num-look-close", "1")          # the shortest look-close pass, for the frames and the answers
ASK = "What is in the picture?"
ALERT = "Is there a person?"


@pytest.fixture(scope="module")
def vila(vila_art):
    """The vila-hd-tiny pipeline, loaded once: the reference answers, and a stream's open VilaPipeline."""
    from ps3edge.llm.pipeline import VilaPipeline

    pipeline = VilaPipeline(vila_art)
    yield pipeline
    pipeline.ps3.close()
    pipeline.llm.close()


def reference(vila, image, question: str, max_new_tokens: int) -> str:
    from ps3edge.llm.generate import SamplingConfig
    from ps3edge.runtime.planning import LookCloseSettings

    return vila.answer(image, question, LookCloseSettings(num_look_close=1), SamplingConfig(max_new_tokens=max_new_tokens)).text


def one_error_line(result, *needles: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- the rules, on their own ----------------------------------------------------------------------

def test_yes_no_reads_the_first_word():
    from ps3edge.streaming.ask import yes_no

    for text, value in [("Yes", "yes"), ("yes.", "yes"), ("  NO!  there is none", "no"), ("**Yes**, a man", "yes"),
                        ("No\nnothing", "no"), ("", "unknown"), ("   ", "unknown"), ("Maybe", "unknown"),
                        ("yes/no", "unknown"), ("Yesterday", "unknown"), ("\ufffd\ufffd", "unknown"), ("I think yes", "unknown")]:
        assert yes_no(text) == value, text


def test_alerts_on_a_scripted_sequence_of_answers():
    """The first yes / no is the initial state, a change from the last yes / no a flip; unknown changes nothing;
    each source and question keeps its own state."""
    from ps3edge.streaming.ask import AlertState, yes_no

    state = AlertState()
    script = ["Maybe", "Yes.", "yes", "I cannot tell", "NO!", "no", "", "Yes, it is", "no"]
    events = [(i, state.update(0, "q", yes_no(text))) for i, text in enumerate(script)]
    assert [(i, e) for i, e in events if e is not None] == [
        (1, (None, True)), (4, ("yes", False)), (7, ("no", False)), (8, ("yes", False))]
    assert state.update(1, "q", "no") == (None, True)            # another source: its own initial state
    assert state.update(0, "other", "no") == (None, True)        # another question too
    assert state.update(0, "q", "no") is None                    # source 0's "q" was last no


def test_the_schedule_skips_due_times_that_pass_while_a_round_runs():
    from ps3edge.streaming.ask import Schedule

    s = Schedule(1.0)
    assert s.due is None
    s.start(10.0)
    s.start(11.0)                                 # only the first frame sets the origin
    assert s.due == 10.0
    assert s.ran(12.5) == 2 and s.skipped == 2 and s.due == 13.0       # 11 and 12 passed while it ran
    s.idle(13.1)                                  # nothing new at 13: not a skip
    assert s.due == 14.0 and s.skipped == 2
    assert s.ran(14.2) == 0 and s.due == 15.0
    assert s.ran(19.5, end=16.5) == 1 and s.due == 20.0 and s.skipped == 3   # none counted after the stream's end


def test_the_turn_lock_serves_in_order():
    from ps3edge.streaming.ask import TurnLock

    lock, order = TurnLock(), []

    def take(name):
        with lock:
            order.append(name)

    with lock:
        threads = []
        for i, name in enumerate(("first", "second", "third")):
            threads.append(threading.Thread(target=take, args=(name,)))
            threads[-1].start()
            deadline = time.monotonic() + 10
            while lock._next < i + 2:             # each has taken its ticket before the next starts
                assert time.monotonic() < deadline
                time.sleep(0.01)
    for t in threads:
        t.join(10)
    assert order == ["first", "second", "third"]


# --- real runs ---------------------------------------------------------------------------------------

def test_ask_and_alert_on_an_image_folder_equal_vila_answer_on_the_same_frames(vila_art, vila, tmp_path):
    from PIL import Image

    from ps3edge.streaming.ask import AlertState, yes_no

    folder = make_folder(tmp_path / "stills", count=3)
    out = tmp_path / "r.jsonl"
    result = cli("stream", vila_art, "--source", folder, "--fps", "0.5", *STEPS, "--ask", ASK, "--alert", ALERT,
                 "--every", "500ms", "--max-frames", "3", "--duration", "60", "--jsonl", out)
    assert result.returncode == 0, result.stderr
    recs = records(out.read_text())
    frames = [r for r in recs if r["type"] == "frame"]
    answers = [r for r in recs if r["type"] == "answer"]
    assert frames and all(r["source"] == "cam0" and r["status"] == "computed" for r in frames)
    assert {r["kind"] for r in answers} == {"ask", "alert"}
    processed = {r["frame"] for r in frames}
    for r in answers:
        assert r["frame"] in processed                    # asked about a processed frame
        image = Image.open(folder / f"{r['frame']:03d}.png")
        tokens = 32 if r["kind"] == "ask" else 4
        assert r["answer"] == reference(vila, image, r["question"], tokens), r
        assert r["generated"] <= tokens and r["latency_ms"] >= r["answer_ms"] > 0
        assert r["value"] == (yes_no(r["answer"]) if r["kind"] == "alert" else None)
    # every round asks the newest frame each question, --ask first
    rounds = sorted({r["round"] for r in answers})
    assert rounds == list(range(1, len(rounds) + 1))
    for n in rounds:
        this = [r for r in answers if r["round"] == n]
        assert [r["question"] for r in this] == [ASK, ALERT] and len({r["frame"] for r in this}) == 1
    # the alert records are what the rule makes of the alert answers, in order (random weights: mostly unknown)
    state, expected = AlertState(), []
    for r in answers:
        if r["kind"] == "alert":
            change = state.update(0, r["question"], r["value"])
            if change is not None:
                expected.append((r["frame"], r["value"], change[0], change[1]))
    assert [(r["frame"], r["value"], r["previous"], r["initial"]) for r in recs if r["type"] == "alert"] == expected
    assert sum(line.startswith("alert cam0") for line in result.stderr.splitlines()) == len(expected)
    # without --jsonl -, each --ask answer is also a line on stdout
    asks = [r for r in answers if r["kind"] == "ask"]
    assert result.stdout.splitlines() == [f"cam0 frame {r['frame']}: {json.dumps(ASK)} -> {' '.join(r['answer'].split())}"
                                          for r in asks]
    summary = next(line for line in result.stderr.splitlines() if line.startswith("ask: "))
    assert summary.startswith(f"ask: {len(answers)} answers in {len(rounds)} rounds every 0.5 s")


def test_the_python_face_shares_one_ps3_and_skips_due_rounds_while_busy(vila, tmp_path):
    import ps3edge
    from ps3edge.runtime.lookclose import Pipeline

    folder = make_folder(tmp_path / "stills", count=4)
    settings = ps3edge.LookCloseSettings(num_look_close=1)
    real_ps3 = vila.ps3
    started = time.monotonic()
    with ps3edge.stream(vila, [f"front={folder}"], settings=settings, fps=2, ask=ASK, every=0.05, max_frames=4,
                        duration=60) as live:
        assert live.encoder.pipeline is real_ps3            # the loop runs the VilaPipeline's own PS3
        got = list(live)
        asker = live.ask
    elapsed = time.monotonic() - started
    assert vila.ps3 is real_ps3 and isinstance(vila.ps3, Pipeline)     # given back when the stream closed
    frames = [r for r in got if isinstance(r, ps3edge.FrameRecord)]
    answers = [r for r in got if isinstance(r, ps3edge.AnswerRecord)]
    assert 1 <= len(frames) <= 4 and answers and all(r.type == "answer" and r.kind == "ask" for r in answers)
    by_frame = {r.frame: r for r in frames}
    for a in answers:                                    # the very pixels the loop processed
        assert np.array_equal(a.image, by_frame[a.frame].image)
        assert a.answer == reference(vila, a.image, ASK, 32)
    # answers take about a second here and are due every 50 ms: the due times in between are skipped, not queued
    assert asker.rounds == len(answers) and asker.skipped > asker.rounds
    assert asker.rounds + asker.skipped + asker.idle <= elapsed / 0.05 + 2
    assert asker.rounds <= elapsed / min(a.answer_ms / 1000 for a in answers) + 1
    # on_answer: the answers go there, the iterator gives frames only
    seen = []
    with ps3edge.stream(vila, [str(folder)], settings=settings, fps=2, ask=ASK, max_frames=1, on_answer=seen.append) as live:
        only = list(live)
    assert len(only) == 1 and isinstance(only[0], ps3edge.FrameRecord)
    assert len(seen) == 1 and seen[0].frame == only[0].frame and seen[0].answer == reference(vila, only[0].image, ASK, 32)


def test_the_python_face_refuses_in_one_line(vila, artifacts, tmp_path):
    import ps3edge
    from ps3edge.runtime.lookclose import Pipeline

    folder = make_folder(tmp_path / "stills", count=1)
    cases = [
        (dict(ask="<image> what is it?"), "must not contain <image>"),
        (dict(ask=ASK, every=0), "--every must be a number of seconds above 0"),
        (dict(ask=ASK, every=float("inf")), "--every must be"),
        (dict(ask=ASK, every=True), "--every must be"),
        (dict(every=2.0), "--every is for VILA-HD questions"),
        (dict(on_answer=print), "on_answer is for VILA-HD questions"),
        (dict(ask=ASK, ask_sources=["back"]), "--ask-source back is not a source; the sources are cam0"),
        (dict(ask=[ASK, ASK]), "is given twice"),
        (dict(alert="  "), "--alert is empty"),
    ]
    for keywords, needle in cases:
        with pytest.raises(ps3edge.Ps3EdgeError) as e:
            ps3edge.stream(vila, [str(folder)], max_frames=1, **keywords)
        assert needle in str(e.value), (keywords, str(e.value))
    with ps3edge.load(artifacts("ps3-tiny")) as encoder:
        with pytest.raises(ps3edge.Ps3EdgeError, match="not an Encoder"):
            ps3edge.stream(encoder, [str(folder)], ask=ASK)
    assert isinstance(vila.ps3, Pipeline)                 # nothing refused kept the PS3 wrapped


# --- the command line's refusals: one line, exit 2, before any source opens ------------------------

@pytest.mark.parametrize("value", ["2 s", "-1s", "0s", "inf", "1e999s", "twos", "0", "25h", "1_0s", ""])
def test_every_is_parsed_strictly(vila_art, value):
    result = cli("stream", vila_art, "--source", "nowhere.mp4", "--ask", ASK, f"--every={value}")
    one_error_line(result, "--every")


def test_the_flags_are_refused_in_one_line_before_anything_loads(artifacts, vila_art, tmp_path):
    missing = str(tmp_path / "nowhere.mp4")            # were a source opened, the error would name it
    ps3 = artifacts("ps3-tiny")
    for args, needle in [
        ((ps3, "--ask", ASK), "need a VILA-HD artifact"),
        ((ps3, "--alert", ALERT), "need a VILA-HD artifact"),
        ((vila_art, "--every", "2s"), "--every is for VILA-HD questions"),
        ((vila_art, "--ask-source", "cam0"), "--ask-source is for VILA-HD questions"),
        ((vila_art, "--max-new-tokens", "8"), "--max-new-tokens is for VILA-HD questions"),
        ((vila_art, "--alert", ALERT, "--max-new-tokens", "8"), "--max-new-tokens sets --ask's answers"),
        ((vila_art, "--ask", ""), "--ask is empty"),
        ((vila_art, "--ask", ASK, "--alert", "   "), "--alert is empty"),
        ((vila_art, "--ask", ASK, "--ask-source", "back"), "--ask-source back is not a source"),
        ((vila_art, "--ask", ASK, "--device", "cpu"), "--device cpu"),
    ]:
        one_error_line(cli("stream", *args[:1], "--source", missing, *args[1:]), needle)


def test_vila_hds_context_and_prompt_checks_come_before_the_sources(vila_copy, tmp_path):
    from ps3edge.artifact.vila import load_vila_manifest

    missing = str(tmp_path / "nowhere.mp4")
    long = cli("stream", vila_copy, "--source", missing, "--ask", "x" * 9000, *STEPS)
    one_error_line(long, "the prompt could take", "shorten the question")
    load_vila_manifest(vila_copy).replace(context_length=1200).write(vila_copy)
    short = cli("stream", vila_copy, "--source", missing, "--alert", ALERT, *STEPS)
    one_error_line(short, "context length 1200 is too short")


@pytest.mark.slow
def test_sigterm_mid_answer_stops_within_a_step(vila_art, tmp_path):
    """A long answer (2000 tokens at most) is running when SIGTERM comes: the stream stops at once (exit 143),
    the answer abandoned at its next LLM step, not finished."""
    import signal
    import subprocess

    from conftest import clean_env, cli_command

    folder = make_folder(tmp_path / "stills", count=2)
    out = tmp_path / "r.jsonl"
    proc = subprocess.Popen([*cli_command(), "stream", str(vila_art), "--source", str(folder), "--fps", "2", "--loop",
                             *STEPS, "--ask", ASK, "--max-new-tokens", "2000", "--every", "1s", "--jsonl", str(out)],
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out.is_file() and '"type": "frame"' in out.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "timed out"
            time.sleep(0.2)
        time.sleep(2.0)                                   # the first answer has begun
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stderr
    assert "terminated" in stderr and "Traceback" not in stderr
    assert took < 20                                      # a frame step and the teardown, not 2000 tokens
    assert re.search(r"^ask: \d+ answers in [1-9]\d* rounds", stderr, flags=re.M), stderr
