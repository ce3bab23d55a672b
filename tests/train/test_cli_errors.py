"""User errors at the command line: one line on stderr that names the file and the problem, exit 2 (STYLE 22).

The guard (train.cli.user_errors) in-process; then `python -m train.predict` as a user runs it, on broken
adapter folders. Every error there comes before a model is loaded, so no model package or network is needed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.cli import user_errors

ROOT = Path(__file__).resolve().parents[2]
TASK = {"model": "smollm2-135m", "label_names": ["negative", "positive"], "label_words": ["negative", "positive"],
        "instruction": "Is the sentiment of this review negative or positive?"}


# ----------------------------------------------------------------------------------------------------------
# the guard

def test_guard_turns_a_value_error_into_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("QLORA_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info, user_errors():
        raise ValueError("rows.csv row 3: no 'label' column\n  add one")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: rows.csv row 3: no 'label' column add one\n"


def test_guard_names_the_path_of_a_system_os_error(capsys, monkeypatch):
    monkeypatch.delenv("QLORA_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info, user_errors():
        open("/nonexistent/x.csv")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: /nonexistent/x.csv: No such file or directory\n"


def test_guard_works_as_a_decorator(capsys, monkeypatch):
    monkeypatch.delenv("QLORA_TRACEBACK", raising=False)

    @user_errors()
    def main():
        json.loads("{")

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: Expecting property name")


def test_guard_reports_ctrl_c_as_exit_130(capsys, monkeypatch):
    monkeypatch.delenv("QLORA_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info, user_errors():
        raise KeyboardInterrupt
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("error", [TypeError("bug"), AttributeError("bug"), RuntimeError("CUDA out of memory")],
                         ids=["TypeError", "AttributeError", "RuntimeError"])
def test_guard_lets_programming_errors_through_with_their_traceback(error, monkeypatch):
    monkeypatch.delenv("QLORA_TRACEBACK", raising=False)
    with pytest.raises(type(error)), user_errors():
        raise error


def test_qlora_traceback_1_re_raises_user_errors(monkeypatch):
    monkeypatch.setenv("QLORA_TRACEBACK", "1")
    with pytest.raises(ValueError, match="bad flag"), user_errors():
        raise ValueError("bad flag")


# ----------------------------------------------------------------------------------------------------------
# python -m train.predict on a broken --adapter

def predict(adapter: Path, *texts: str, stdin: str = "") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "train.predict", "--adapter", str(adapter), *texts]
    return subprocess.run(cmd, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "QLORA_TRACEBACK": "0"})   # a developer's QLORA_TRACEBACK=1 off


def adapter_with(tmp_path: Path, task_json: str | None) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    if task_json is not None:
        (folder / "task.json").write_text(task_json)
    return folder


def missing_folder(tmp_path):
    return tmp_path / "no-such-run" / "adapter"


def a_file(tmp_path):
    (tmp_path / "adapter").write_text("not a folder")
    return tmp_path / "adapter"


BROKEN = {   # id: (make the --adapter path, what the one line must say besides the path)
    "missing-folder": (missing_folder, ["no-such-run/adapter does not exist", "--out"]),
    "a-file-not-a-folder": (a_file, ["adapter is a file"]),
    "no-task-json": (lambda t: adapter_with(t, None), ["task.json is missing", "train.recipe"]),
    "truncated-task-json": (lambda t: adapter_with(t, json.dumps(TASK)[:40]),
                            ["task.json is not valid JSON", "line 1, column 41", "re-run"]),
    "task-json-missing-model": (lambda t: adapter_with(t, json.dumps({k: v for k, v in TASK.items()
                                                                       if k != "model"})),
                                ["task.json lacks the key(s) model", "add them or re-run"]),
    "task-json-is-a-list": (lambda t: adapter_with(t, json.dumps([TASK])),
                            ["task.json holds an array, not a JSON object"]),
    "label-names-a-string": (lambda t: adapter_with(t, json.dumps({**TASK, "label_names": "negative"})),
                             ['"label_names" must be a list of two or more strings']),
    "unknown-kind": (lambda t: adapter_with(t, json.dumps({**TASK, "kind": ["causal"]})),
                     ['unknown "kind"']),
}


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}; stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stdout == "", proc.stderr
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in {proc.stderr!r}"


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_predict_with_a_broken_adapter_is_one_line_and_exit_2(case, tmp_path):
    make, needles = BROKEN[case]
    adapter = make(tmp_path)
    assert_one_line_error(predict(adapter, "a fine movie"), str(adapter), *needles)   # names the path


def test_predict_with_empty_stdin_is_one_line_and_exit_2(tmp_path):
    adapter = adapter_with(tmp_path, json.dumps(TASK))        # valid, so the texts are what fails
    assert_one_line_error(predict(adapter, stdin="\n  \n"), "no texts", "stdin was empty")
