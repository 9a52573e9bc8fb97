"""One process per work folder, and a converter that never outlives quantkit.

Two real processes: a `quantkit run` whose converter (the double) hangs mid-measurement, and a second
command on the same work folder. Waiting is for events (a file appearing, a process ending), each with a
generous deadline that only turns a hang into a failure; nothing asserts how long anything took.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from guarded import copy_model, tree_hash
from quantkit.cli.main import cli
from quantkit.errors import WorkFolderBusy
from quantkit.exl2 import converter as conv
from quantkit.worklock import work_lock
from workfolders import make_work

REPO_ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 120  # seconds before a wait gives up: a hang fails the test instead of blocking CI


def wait_for(predicate, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    return conv._start_ticks(pid) is not None


def recipe(tmp_path: Path, model: Path) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(f'model = "{model}"\nwork = "w"\nrows = 2\nmeasurement_rows = 2\nlength = 64\n'
                    '[[branch]]\nname = "6_5"\nbits = 6.5\n')
    return path


def start_quantkit(args: list[str], *, hang_at: str | None) -> subprocess.Popen[str]:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    if hang_at:
        env |= {"QK_DOUBLE_FAIL_AT": hang_at, "QK_DOUBLE_FAIL_MODE": "hang"}
    return subprocess.Popen([sys.executable, "-m", "quantkit.cli.main", *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def converter_pid(job_dir: Path) -> int | None:
    try:
        return int(json.loads((job_dir / conv.PID_NAME).read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture
def hung_run(tmp_path, tiny_llama, converter_double):
    """A `quantkit run` in another process, its converter hung in the measurement."""
    model = copy_model(tiny_llama, tmp_path / "model")
    r = recipe(tmp_path, model)
    proc = start_quantkit(["run", str(r)], hang_at="measure_quant")
    job = tmp_path / "w" / "measure"
    wait_for(lambda: converter_pid(job) is not None and alive(converter_pid(job)) or proc.poll() is not None, "the converter to start")
    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    yield proc, r, model, converter_pid(job)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    pid = converter_pid(job)
    if pid is not None and alive(pid):
        os.killpg(pid, signal.SIGKILL)


@pytest.mark.parametrize("command", ["run", "measure", "convert", "publish", "card"])
def test_a_second_process_is_refused_naming_the_holder(command, hung_run, tmp_path):
    proc, r, model, _ = hung_run
    before = tree_hash(model)
    work = tmp_path / "w"
    args = {"run": ["run", str(r)], "measure": ["measure", str(model), "--work", str(work)],
            "convert": ["convert", str(model), "--work", str(work), "--bits", "6.5"],
            "publish": ["publish", str(work), "--repo", "a/b"],
            "card": ["card", str(work), "--output", str(work / "README.md")]}[command]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1, res.output
    line = res.output.strip().splitlines()[-1]
    assert f"in use by PID {proc.pid}" in line and f"quantkit run {r}" in line, line
    assert not (work / "README.md").exists()
    assert tree_hash(model) == before


def test_kill_9_of_quantkit_takes_its_converter_down_and_the_rerun_finishes(hung_run, tmp_path, converter_double):
    proc, r, model, converter = hung_run
    before = tree_hash(model)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not alive(converter), f"converter {converter} to die with quantkit")
    res = CliRunner().invoke(cli, ["run", str(r)])  # the lock went with the dead process
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "w" / "state.json").read_text())["steps"]["convert:6_5"]["status"] == "done"
    assert tree_hash(model) == before


def test_a_live_orphan_converter_recorded_in_the_job_folder_is_stopped_and_said(tmp_path, tiny_llama, converter_double):
    """A converter that outlived its quantkit (another OS, or one started before this version)."""
    from quantkit.branches import Branch
    from quantkit.pipeline import Pipeline, Settings

    work = tmp_path / "w"
    (work / "measure").mkdir(parents=True)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        conv._record_pid(work / "measure", orphan.pid, ["convert_exl2"])
        said: list[str] = []
        s = Settings(model=str(tiny_llama), rows=2, measurement_rows=2, length=64, branches=[Branch(name="6_5", bits=6.5)])
        p = Pipeline(s, work, listener=lambda step, line: said.append(line.text) if line is not None and line.kind == "warning" else None)
        p.lock()
        p.measure()
        assert orphan.wait(DEADLINE) == -signal.SIGTERM
        assert any(f"PID {orphan.pid}" in x and "stopping it" in x for x in said), said
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_a_recorded_pid_now_used_by_another_process_is_left_alone(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        job = tmp_path / "job"
        job.mkdir()
        (job / conv.PID_NAME).write_text(json.dumps({"pid": other.pid, "start_ticks": 1, "argv": []}))  # another start
        conv.stop_orphan(job, lambda m: pytest.fail(m))
        assert other.poll() is None and not (job / conv.PID_NAME).exists()
    finally:
        other.kill()
        other.wait()


def test_the_lock_is_free_again_after_the_holder_is_done(tmp_path):
    work = make_work(tmp_path)
    with work_lock(work, "quantkit publish w"):
        pass
    with work_lock(work, "quantkit publish w"):
        pass


def test_the_lock_refuses_in_process_too(tmp_path):
    work = tmp_path / "w"
    with work_lock(work, "quantkit measure m --work w"):
        child = subprocess.run([sys.executable, "-c", (
            "import sys; from pathlib import Path; from quantkit.worklock import work_lock\n"
            "from quantkit.errors import WorkFolderBusy\n"
            f"try:\n    work_lock(Path({str(work)!r}), 'x').__enter__()\nexcept WorkFolderBusy as e:\n"
            "    print(e.pid, e.command); sys.exit(3)\n")],
            capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(REPO_ROOT)})
    assert child.returncode == 3 and child.stdout.split()[0] == str(os.getpid()) and "quantkit measure" in child.stdout
    assert WorkFolderBusy  # the error type the CLI turns into one line


def test_a_converter_whose_quantkit_is_alive_is_not_an_orphan(tmp_path):
    """Two processes driving the core without the CLI's lock: the second refuses instead of killing."""
    from quantkit.files import write_json_atomic

    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        job = tmp_path / "job"
        job.mkdir()
        write_json_atomic(job / conv.PID_NAME, {"pid": child.pid, "start_ticks": conv._start_ticks(child.pid), "argv": [],
                                                "quantkit_pid": owner.pid, "quantkit_start_ticks": conv._start_ticks(owner.pid)})
        with pytest.raises(WorkFolderBusy) as info:
            conv.stop_orphan(job, lambda m: pytest.fail(m))
        assert info.value.pid == owner.pid and child.poll() is None
    finally:
        for p in (owner, child):
            p.kill()
            p.wait()
