"""Issue 13 through the real CLI: edgemml never touches what it did not create, never accepts an
artifact whose bytes changed, never hangs on an input, and answers a user's mistake (a full disk, a
read-only folder, a hostile pipeline file) with exit 2 and the path, not exit 3."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import cli_env, interruptible, need_tool, read_calls, run_cli, write
from test_cli_engine import PIPELINE, _explain, _start_and_kill_during


def _user_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 2, one clear message holding `words`, no traceback."""
    assert proc.returncode == 2, _explain(proc)
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, _explain(proc)
    text = " ".join(proc.stderr.split())
    for w in words:
        assert w in text, f"{w!r} missing\n{_explain(proc)}"


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


# ---- 1. ownership of the run folder ------------------------------------------------------------


def test_a_folder_edgemml_did_not_create_is_refused_untouched(project):
    root, env = project
    thesis = root / "thesis"
    write(thesis / "01-toy_source/thesis.txt", "chapter 1")
    write(thesis / "manifest.json", '{"title": "my thesis"}')
    (thesis / "07-double").mkdir()
    before = _snapshot(thesis)
    for command in ("run", "check"):
        proc = run_cli(command, "pipeline.yaml", "--out", "thesis", cwd=root, env=env)
        _user_error(proc, "thesis is not an edgemml run folder", "01-toy_source")
    assert _snapshot(thesis) == before

    write(root / "afile", "x")
    top = sorted(os.listdir("/"))
    for out, words in (("afile", "is a file"), ("afile/sub", "afile is a file"),
                       ("/", "root of the file system")):
        for command in ("run", "check"):
            _user_error(run_cli(command, "pipeline.yaml", "--out", out, cwd=root, env=env), words)
    write(root / "file.yaml", PIPELINE.replace("name: toy", "name: toy\noutput_dir: afile"))
    for command in ("run", "check"):  # check used to call this file valid
        _user_error(run_cli(command, "file.yaml", cwd=root, env=env), "afile is a file, not a folder")
    assert (root / "afile").read_text() == "x" and sorted(os.listdir("/")) == top

    home = root / "home"
    write(home / ".profile", "export X=1\n")
    write(root / "home.yaml", PIPELINE.replace("name: toy", 'name: toy\noutput_dir: "~"'))
    for command in ("run", "check"):
        proc = run_cli(command, "home.yaml", cwd=root, env=dict(env, HOME=str(home)))
        _user_error(proc, "is the home folder")
    assert os.listdir(home) == [".profile"]

    (root / "empty").mkdir()  # an empty folder becomes a run folder, and stays usable
    assert run_cli("run", "pipeline.yaml", "--out", "empty", cwd=root, env=env).returncode == 0
    assert json.loads((root / "empty/manifest.json").read_text())["format"] == "edgemml-run"
    again = run_cli("run", "pipeline.yaml", "--out", "empty", cwd=root, env=env)
    assert again.returncode == 0 and "0 stage(s) ran, 3 cached" in again.stdout, _explain(again)


def test_only_its_own_stage_folder_is_renumbered(project):
    """A stage's folder under an old number is renamed into place only when it holds that
    stage's stage.json; a user's folder of the same shape is left alone."""
    root, env = project
    assert run_cli("run", "pipeline.yaml", cwd=root, env=env).returncode == 0
    run_dir = root / "runs/toy"
    write(run_dir / "07-extra/notes.txt", "mine")
    renamed = PIPELINE.replace("  - name: double", "  - name: extra\n    type: toy_scale\n"
                                                  "    factor: 1\n  - name: double")
    write(root / "pipeline.yaml", renamed)
    proc = run_cli("run", "pipeline.yaml", cwd=root, env=env)
    assert proc.returncode == 0, _explain(proc)
    assert (run_dir / "07-extra/notes.txt").read_text() == "mine"
    assert (run_dir / "03-double/stage.json").is_file()  # moved from 02-double: it was edgemml's


# ---- 2. an artifact whose bytes changed is never trusted -----------------------------------------


def test_changed_bytes_with_kept_size_and_mtime_rerun_the_stage(project, calls_file):
    root, env = project
    assert run_cli("run", "pipeline.yaml", cwd=root, env=env).returncode == 0
    target = root / "runs/toy/02-double/model/value.txt"
    st = target.stat()
    target.write_text("7")  # same size; then the old time, as `touch -r` or a copy tool would
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    calls_file.unlink()
    proc = run_cli("run", "pipeline.yaml", cwd=root, env=env)
    assert proc.returncode == 0, _explain(proc)
    assert "changed on disk (sha256 differs)" in proc.stderr
    assert read_calls(calls_file) == ["double"] and target.read_text() == "6"


def test_verify_rehashes_outputs_the_plan_does_not_look_at(project, calls_file):
    root, env = project
    assert run_cli("run", "pipeline.yaml", cwd=root, env=env).returncode == 0
    (root / "runs/toy/03-triple/model/value.txt").write_text("19")
    plain = run_cli("check", "pipeline.yaml", "--set", "stages.double.factor=5", cwd=root, env=env)
    assert plain.returncode == 0 and "changed on disk" not in plain.stdout, _explain(plain)
    checked = run_cli("check", "pipeline.yaml", "--set", "stages.double.factor=5", "--verify",
                      cwd=root, env=env)
    text = " ".join(checked.stdout.split())
    assert checked.returncode == 0 and "--verify: output 'model'" in text, _explain(checked)
    calls_file.unlink()
    only = run_cli("run", "pipeline.yaml", "--only", "double", "--verify", cwd=root, env=env)
    assert only.returncode == 0, _explain(only)
    assert read_calls(calls_file) == ["double"]
    assert "triple: --verify: output 'model' model/value.txt changed on disk" in \
        " ".join(only.stderr.split())


# ---- 5, 12. hostile pipeline files ---------------------------------------------------------------


LAUGHS = "name: x\n" + "".join(
    f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join(
        ["1"] * 9 if i == 0 else [f"*{chr(96 + i)}"] * 9) + "]\n" for i in range(9)) + \
    "stages: [{type: toy_source}]\n"


@pytest.mark.parametrize("text, words", [
    (LAUGHS, ["refused: more than 100,000 values (aliases expanded)"]),
    ("name: x\nx: &x [*x]\nstages: [{type: toy_source}]\n",
     ["x.yaml:2: refused: alias *x refers to a value that contains it"]),
    ("name: x\nstages: " + "[" * 100 + "]" * 100 + "\n", ["refused: nested more than 64 levels"]),
    ("name: x\x00\x01\x02\nstages: []\n", ["x.yaml:1: not a YAML text file", "#x0000"]),
    ("name: \xff\xfe\nstages: []\n", ["x.yaml:1: not UTF-8 text"]),
    ("# " + "x" * (5 * 1024 * 1024) + "\nname: x\n", ["the limit is 4.2 MB"]),
])
def test_hostile_pipeline_files_are_refused_quickly(tmp_path, text, words):
    path = tmp_path / "x.yaml"
    path.write_bytes(text.encode("latin-1") if "\xff" in text else text.encode())
    for command in ("check", "run"):
        proc = run_cli(command, "x.yaml", cwd=tmp_path, timeout=120)
        _user_error(proc, *words)
    assert not (tmp_path / "runs").exists()


def test_set_values_have_the_same_limits(project):
    root, env = project
    levels = ["&l0 [" + ",".join(["1"] * 9) + "]"]
    levels += [f"&l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    proc = run_cli("check", "pipeline.yaml", "--set", f"stages.0.value=[{', '.join(levels)}]",
                   cwd=root, env=env, timeout=120)
    _user_error(proc, "--set 'stages.0.value=", "refused: more than 100,000 values")


def test_unknown_architecture_is_refused_by_check(tmp_path):
    write(tmp_path / "p.yaml", """
        name: a
        preprocess: {channels: gray}
        data: {source: "builtin:digits"}
        stages:
          - type: finetune
            max_steps: 1
            model: {arch: torchvision/resnet1800}
    """)
    for command in ("check", "run"):
        _user_error(run_cli(command, "p.yaml", cwd=tmp_path),
                    "p.yaml:7: stages[0].finetune.model.arch: unknown architecture",
                    "did you mean 'torchvision/resnet18'?")


# ---- 6. device files and huge inputs are refused before anything reads them --------------------


@pytest.mark.parametrize("stage, words", [
    ("init_checkpoint: /dev/zero\n    model: {arch: torchvision/resnet18}",
     ["init_checkpoint: checkpoint /dev/zero is a device, not a file"]),
    ("init_checkpoint: /usr\n    model: {arch: torchvision/resnet18}",
     ["checkpoint /usr is a folder, not a file"]),
    ("model: {arch: torchvision/resnet18}\n    data: {source: /dev/zero}",
     ["/dev/zero is a device, not a file or folder"]),
    ("model: {arch: torchvision/resnet18}\n    data: {source: many}",
     ["data folder", "holds more than 10 files", "EDGEMML_MAX_INPUT_FILES"]),
])
def test_devices_and_huge_inputs_are_refused_before_reading(tmp_path, stage, words):
    for i in range(12):
        write(tmp_path / "many" / f"c{i % 2}" / f"{i}.png", "not read")
    write(tmp_path / "p.yaml", f"""
name: dev
preprocess: {{channels: gray}}
data: {{source: "builtin:digits"}}
stages:
  - type: finetune
    max_steps: 1
    {stage}
""")
    env = cli_env({"EDGEMML_MAX_INPUT_FILES": "10"})
    for command in ("check", "run"):
        proc = run_cli(command, "p.yaml", cwd=tmp_path, env=env, timeout=120)  # was: a hang
        _user_error(proc, *words)


# ---- 7. partial work folders: resumed idempotently or discarded; orphans removed -------------


def test_orphaned_and_symlinked_partials(project, calls_file):
    root, env = project
    assert run_cli("run", "pipeline.yaml", cwd=root, env=env).returncode == 0
    run_dir = root / "runs/toy"
    write(run_dir / ".05-renamed.partial/.edgemml-partial", "0" * 64)
    write(run_dir / ".05-renamed.partial/big.bin", "left by a killed run")
    write(run_dir / ".02-double.old-999999999/model/value.txt", "6")
    proc = run_cli("run", "pipeline.yaml", cwd=root, env=env)
    assert proc.returncode == 0, _explain(proc)
    assert "removed .05-renamed.partial" in proc.stderr
    assert not (run_dir / ".05-renamed.partial").exists()
    assert not (run_dir / ".02-double.old-999999999").exists()

    elsewhere = root / "elsewhere"
    write(elsewhere / "keep.txt", "mine")
    (run_dir / ".03-triple.partial").symlink_to(elsewhere)
    proc = run_cli("run", "pipeline.yaml", "--force", cwd=root, env=env)
    _user_error(proc, ".03-triple.partial is a symbolic link")
    assert (elsewhere / "keep.txt").read_text() == "mine" and len(os.listdir(elsewhere)) == 1


def test_a_killed_stage_that_does_not_resume_starts_clean(project, calls_file):
    """toy_scale's work is not idempotent (it creates a folder, as copytree does): the work folder
    a SIGKILL left must be discarded, not reused (it used to fail with FileExistsError, exit 3)."""
    root, env = project
    paused = (root, dict(env, EDGEMML_TEST_PAUSE="double"))  # the same fingerprint as a plain run
    _start_and_kill_during(paused, "double", [])
    assert (root / "runs/toy/.02-double.partial/copied").is_dir()
    for args in ([], ["--from", "double"]):
        again = run_cli("run", "pipeline.yaml", *args, cwd=root, env=env)
        assert again.returncode == 0, _explain(again)
        assert "resuming from an interrupted attempt" not in again.stderr
    assert (root / "runs/toy/03-triple/model/value.txt").read_text() == "18"


# ---- 8, 9. OSError: exit 2 with the path and the system's words ---------------------------------


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_full_disk_names_the_folder_and_exits_2(project):
    """A write that fails (here: over `ulimit -f`, EFBIG; a full disk gives ENOSPC the same way,
    with no file name in the error) is the user's to fix, not a bug."""
    root, env = project
    proc = subprocess.run([sys.executable, "-m", "edgemml.cli", "run", "pipeline.yaml",
                           "--set", "stages.double.write_mb=4"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=_limit_file_size)
    _user_error(proc, "stage double:", "runs/toy/.02-double.partial", "File too large (EFBIG)")
    summary = json.loads((root / "runs/toy/run.json").read_text())
    assert summary["status"] == "failed" and "File too large" in summary["error"]


def test_no_space_left_is_worded_with_path_and_errno():
    from edgemml.errors import ArtifactError
    from edgemml.paths import os_error

    err = os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), Path("/r/.01-x.partial"),
                   doing="write in", run_dir=Path("/r"))
    assert isinstance(err, ArtifactError) and err.exit_code == 2
    assert err.message == "cannot write in /r/.01-x.partial: No space left on device (ENOSPC)"
    assert "--out" in (err.hint or "")


def _as_user(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run without root's powers (root writes into read-only folders anyway): as `nobody`
    through util-linux's setpriv when this is root."""
    if os.getuid() == 0:
        setpriv = need_tool("setpriv", install="util-linux; needed to drop root's privileges")
        cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_read_only_run_folder_is_a_user_error():
    root = Path(tempfile.mkdtemp(prefix="edgemml-ro-"))  # reachable by an unprivileged user
    try:
        os.chmod(root, 0o755)
        write(root / "pipeline.yaml", PIPELINE)
        env = cli_env({"HOME": str(root)})
        cmd = [sys.executable, "-m", "edgemml.cli", "run", "pipeline.yaml"]
        assert subprocess.run(cmd, cwd=root, env=env, capture_output=True).returncode == 0
        for p in [root / "runs/toy", *(root / "runs/toy").rglob("*")]:
            os.chmod(p, 0o555 if p.is_dir() else 0o444)
        proc = _as_user(cmd, root, env)  # every stage is cached: only the lock needs writing
        _user_error(proc, "runs/toy/.lock", "Permission denied (EACCES)")
    finally:
        for p in root.rglob("*"):
            if p.is_dir() and not p.is_symlink():
                os.chmod(p, 0o755)
        shutil.rmtree(root)


# ---- 10, 15. crash hints, Ctrl-C, user text on the console ---------------------------------------


def test_crash_hint_is_the_users_own_command(project):
    root, env = project
    proc = run_cli("run", "pipeline.yaml", "--set", "stages.triple.crash=true", "--out", "o x",
                   cwd=root, env=env)
    assert proc.returncode == 3, _explain(proc)
    assert "resume with: edgemml run pipeline.yaml --set stages.triple.crash=true --out 'o x'" \
        in " ".join(proc.stderr.split())
    assert "RuntimeError: simulated bug" in (root / "o x/error.log").read_text()


def test_resume_command_repeats_the_users_own_arguments():
    from edgemml.cli import _resume_command

    assert _resume_command("validate", Path("trunc.yaml"), ("gates.all.min_top1=70",),
                           Path("my runs")) == \
        "edgemml validate trunc.yaml --set gates.all.min_top1=70 --out 'my runs'"
    assert _resume_command("run", Path("p.yaml"), (), None) == "edgemml run p.yaml"


def test_ctrl_c_says_how_to_resume(project):
    root, env = project
    started = root / "started.txt"
    env = dict(env, EDGEMML_TEST_STARTED=str(started))
    proc = subprocess.Popen([sys.executable, "-m", "edgemml.cli", "run", "pipeline.yaml",
                             "--set", "stages.double.sleep_s=60"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    deadline = time.time() + 60
    while not started.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: finished stages are kept; run the same command to resume" in err


def test_user_text_is_printed_as_is_not_as_markup(project):
    root, env = project
    proc = run_cli("run", "pipeline.yaml", "--from", "root:x:0[bold]", cwd=root, env=env)
    _user_error(proc, "--from root:x:0[bold]: no such stage")
    out = "o[bold]k:x:"
    proc = run_cli("run", "pipeline.yaml", "--out", out, cwd=root, env=env)
    assert proc.returncode == 0 and f"{root / out}" in " ".join(proc.stdout.split()), _explain(proc)
    check = run_cli("check", "pipeline.yaml", "--out", out, cwd=root, env=env)
    assert check.returncode == 0 and "\u274c" not in check.stdout, _explain(check)
    assert "/o[bold]k:x:" in "".join(check.stdout.split()), _explain(check)  # folded by the table


# ---- 3, 4, 11. class names: one printable line each; two classes or more -------------------------


@pytest.mark.parametrize("classes, words", [
    (["a\nb", "c"], ["class name 'a\\nb' contains a line break"]),
    (["a\u2028b", "c"], ["class name 'a\\u2028b' contains a line break"]),
    (["only"], ["has 1 class ('only'); a classifier needs at least 2"]),
])
def test_bad_class_folders_are_refused_before_training(tmp_path, classes, words):
    from PIL import Image

    for name in classes:
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), 30 * i).save(tmp_path / "imgs" / name / f"{i}.png")
    write(tmp_path / "p.yaml", """
        name: c
        preprocess: {size: [8, 8], channels: gray}
        data: {source: imgs}
        stages:
          - {type: finetune, max_steps: 1, model: {arch: torchvision/resnet18}}
    """)
    proc = run_cli("run", "p.yaml", cwd=tmp_path, timeout=300)
    _user_error(proc, *words)
    assert "training" not in proc.stderr  # refused when the data is read, before any training
