"""The Ray cluster queue on a local Ray cluster with three declared GPUs (one `ray.init` for the
module) and the converter double: three branches convert at once on three GPUs, a worker killed
mid-conversion is retried and resumes, a node that cannot fetch its model fails that task only,
the driver's state makes a rerun redo only what is missing; and the bad input refused before anything
starts (Ray missing, an address that does not answer).

The double: a scheduling test, with a converter that can be delayed and killed at a chosen point."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from quantkit.exl2.converter import log_path
from quantkit import hub
from quantkit.branches import Branch
from quantkit.cli.main import cli
from quantkit.cluster import QueueItem, run_queue
from quantkit.errors import ClusterTasksFailed, HubOffline
from quantkit.pipeline import Settings
from quantkit.publish import PublishOptions
from quantkit.publish.git_target import GitTarget
from test_parallel import runs


REPO = Path(__file__).resolve().parent.parent
DOUBLE = REPO / "tests" / "double" / "convert_exl2.py"
BITS = (8.0, 6.5, 5.0)


def settings(model: Path | str, bits: tuple[float, ...] = BITS) -> Settings:
    return Settings(model=str(model), rows=2, measurement_rows=2, length=64,
                    branches=[Branch(name=f"{b:g}", bits=b, head_bits=8) for b in bits])


def state(work: Path) -> dict:
    return json.loads((work / "state.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe(tmp_path: Path, model: Path) -> Path:
    (path := tmp_path / "r.toml").write_text(f'model = "{model}"\nwork = "w"\nrows = 2\nmeasurement_rows = 2\nlength = 64\n')
    return path


# ---- bad input: one line each, nothing started (no cluster needed) ----------------------------------------

def test_without_ray_installed_the_cluster_option_says_which_extra(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    r = CliRunner().invoke(cli, ["run", str(recipe(tmp_path, tiny_llama)), "--cluster", "auto"])
    assert r.exit_code == 1, r.output
    assert r.output.count("\n") == 1 and 'pip install "quantkit-exl2[ray]"' in r.output
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("scheme", ["ray://", ""])
def test_an_address_that_does_not_answer_is_refused_before_anything_starts(tmp_path, tiny_llama, monkeypatch, scheme):
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # even while this module's cluster runs
    address = f"{scheme}127.0.0.1:{free_port()}"
    r = CliRunner().invoke(cli, ["run", str(recipe(tmp_path, tiny_llama)), "--cluster", address])
    assert r.exit_code == 1, r.output
    assert r.output.count("\n") == 1 and f"the Ray cluster at {address} does not answer" in r.output
    assert not (tmp_path / "w").exists()


def test_gpus_and_cluster_do_not_mix(tmp_path, tiny_llama):
    r = CliRunner().invoke(cli, ["run", str(recipe(tmp_path, tiny_llama)), "--cluster", "auto", "--gpus", "0"])
    assert r.exit_code == 2 and "drop --gpus" in r.output


# ---- a local cluster ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray cluster for the module: 3 declared GPUs, the converter double on every worker.
    Tests steer the double through the file QK_DOUBLE_ENV_FILE names (workers outlive a test's env)."""
    ray = pytest.importorskip("ray")
    root = tmp_path_factory.mktemp("cluster")
    control = root / "double.json"
    control.write_text("{}")
    env = {"QUANTKIT_CONVERTER": f"{sys.executable} {DOUBLE}", "QUANTKIT_CONVERTER_VERSION": "0.3.2+double",
           "QK_DOUBLE_ENV_FILE": str(control), "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"),
           "PYTHONPATH": str(REPO)}
    ray.init(num_cpus=4, num_gpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": env})
    yield SimpleNamespace(control=control, root=root)
    ray.shutdown()


@pytest.fixture
def double(cluster):
    def set_(**values: object) -> None:
        cluster.control.write_text(json.dumps({k: str(v) for k, v in values.items()}))

    yield set_
    cluster.control.write_text("{}")


def node_jobs(node_root: Path) -> dict[str, Path]:
    """branch -> the job folder its node converted it in."""
    return {p.parent.parent.name.removeprefix("convert-"): p for p in node_root.glob("*/convert-*/jobs/*") if p.is_dir()}


def test_three_branches_on_three_gpus_convert_at_once_and_publish_from_their_node(tmp_path, tiny_llama, cluster, double):
    double(QK_DOUBLE_BARRIER=f"{tmp_path / 'barrier'}:3")
    work, repo, nodes = tmp_path / "w", tmp_path / "repo", tmp_path / "nodes"
    seen: list[tuple[str, object]] = []
    reports = run_queue([QueueItem(settings=settings(tiny_llama), work=work, publish=PublishOptions(to=repo))],
                        listener=lambda step, line: seen.append((step, line)), node_root=str(nodes))
    assert set(reports[0].branches) == {"8", "6.5", "5"}
    jobs = node_jobs(nodes)
    assert set(jobs) == {"8", "6.5", "5"}
    conv = [runs(j)[0] for j in jobs.values()]
    assert sorted(c[2] for c in conv) == ["0", "1", "2"]  # Ray gave each conversion its own GPU
    assert max(c[0] for c in conv) < min(c[1] for c in conv)  # and all three ran together:
    assert all("barrier passed" in log_path(j).read_text() for j in jobs.values())  # each waited for the others
    s = state(work)
    target = GitTarget(repo).id
    assert s["steps"]["measure"]["status"] == "done" and (work / "measurement.json").is_file()
    for b in ("8", "6.5", "5"):
        assert s["steps"][f"convert:{b}"]["status"] == "done"
        assert s["published"][b][target]["verified"] is True
        out = next(nodes.glob(f"*/convert-{b}/out/{b}"))  # published from the node's folder...
        blob = subprocess.run(["git", "-C", str(repo), "show", f"{b}:output.safetensors"], capture_output=True, check=True).stdout
        data = (out / "output.safetensors").read_bytes()  # the bytes, or their LFS pointer where git-lfs is installed
        assert blob == data or f"oid sha256:{hashlib.sha256(data).hexdigest()}".encode() in blob
    assert not (work / "jobs").exists() and not (work / "out").exists()  # ...not from the driver's
    # the measurement came through the object store: the node's copy is the driver's, byte for byte
    assert next(nodes.glob("*/convert-8/measurement.json")).read_bytes() == (work / "measurement.json").read_bytes()
    steps = {step for step, line in seen if line is not None and getattr(line, "status", None) is not None}
    assert {"tiny-llama measure", "tiny-llama convert:8", "tiny-llama convert:6.5", "tiny-llama convert:5"} <= steps

    # A rerun finds everything done in the driver's state: no task runs, no converter starts.
    before = {b: log_path(j).read_text() for b, j in jobs.items()}
    run_queue([QueueItem(settings=settings(tiny_llama), work=work, publish=PublishOptions(to=repo))], node_root=str(nodes))
    assert {b: log_path(j).read_text() for b, j in jobs.items()} == before


def test_a_worker_killed_mid_conversion_is_retried_and_resumes(tmp_path, tiny_llama, cluster, double):
    marker = tmp_path / "killed"
    double(QK_DOUBLE_JOB_SECONDS=0.5, QK_DOUBLE_FAIL_AT="quant:2", QK_DOUBLE_FAIL_MODE="kill-parent", QK_DOUBLE_FAIL_ONCE=marker)
    work, nodes = tmp_path / "w", tmp_path / "nodes"
    run_queue([QueueItem(settings=settings(tiny_llama, (8.0,)), work=work, publish=PublishOptions(to=tmp_path / "repo"))],
              node_root=str(nodes), max_retries=2)
    assert marker.exists()  # the worker running the conversion was killed once
    log = log_path(node_jobs(nodes)["8"]).read_text()
    first, second = log.split("\n=== 20")[1:]  # the worker writes this log: two attempts, one each
    assert "=== exit" not in first  # the first attempt's worker died with its converter
    assert "Resuming job" in second and "=== exit 0" in second  # the retry resumed the converter's job
    assert state(work)["steps"]["convert:8"]["status"] == "done"


def test_a_node_that_cannot_fetch_its_model_fails_that_task_and_the_others_go_on(tmp_path, tiny_llama, cluster, double, monkeypatch):
    # The driver reaches the Hub (a stub: config and tokenizer only); the nodes are offline.
    monkeypatch.setattr(hub, "ensure_reachable", lambda repo_id, timeout=3.0: None)
    monkeypatch.setattr(hub, "get_hf_api", lambda: SimpleNamespace(
        hf_hub_download=lambda repo_id, filename, revision=None: str(tiny_llama / filename),
        get_safetensors_metadata=lambda repo_id, revision=None: SimpleNamespace(files_metadata={}),
        snapshot_download=lambda repo_id, allow_patterns=None: str(tiny_llama)))
    nodes = tmp_path / "nodes"
    good, bad = tmp_path / "good", tmp_path / "bad"
    items = [QueueItem(settings=settings("alice/tiny-llama", (8.0,)), work=bad, publish=PublishOptions(to=tmp_path / "r1")),
             QueueItem(settings=settings(tiny_llama, (8.0,)), work=good, publish=PublishOptions(to=tmp_path / "r2"))]
    with pytest.raises(ClusterTasksFailed) as info:
        run_queue(items, node_root=str(nodes))
    assert list(info.value.failures) == ["alice/tiny-llama measure"]
    assert isinstance(info.value.failures["alice/tiny-llama measure"], HubOffline)  # the node's own reason
    assert state(bad)["steps"]["measure"]["status"] == "failed"
    assert state(good)["steps"]["convert:8"]["status"] == "done"  # the other recipe went on
    from quantkit.cli.errors import format_error

    msg = format_error(info.value)
    assert "1 cluster task(s) failed" in msg and "Hugging Face Hub cannot be reached" in msg and "\n" not in msg


def test_the_cli_runs_a_queue_of_recipes_on_the_cluster(tmp_path, tiny_llama, cluster, double):
    paths = []
    for name in ("a", "b"):
        (d := tmp_path / name).mkdir()
        (p := d / "r.toml").write_text(f'model = "{tiny_llama}"\nwork = "w"\nrows = 2\nmeasurement_rows = 2\nlength = 64\n'
                                       '[[branches]]\nname = "8"\nbits = 8.0\n[publish]\nto = "repo"\n')
        paths.append(str(p))
    r = CliRunner().invoke(cli, ["run", *paths, "--cluster", "auto", "--node-work", str(tmp_path / "nodes")])
    assert r.exit_code == 0, r.output
    assert "cluster queue: 2 recipe(s)" in r.output
    for name in ("a", "b"):
        assert state(tmp_path / name / "w")["steps"]["convert:8"]["status"] == "done"
        assert subprocess.run(["git", "-C", str(tmp_path / name / "repo"), "rev-parse", "8"], capture_output=True).returncode == 0
