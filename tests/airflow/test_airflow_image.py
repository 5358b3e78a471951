"""The DAG whose tasks run the project's image (issue 32): FASHION_TAGGER_RUN_IN=kubernetes (KubernetesPodOperator)
or docker (DockerOperator), and credentials from Airflow Connections handed to the tagger as its environment.

- The three ways (process, kubernetes, docker) have the same steps, arguments, pool, Asset, timeouts and retries.
- The pod spec is rendered offline: image, args, env from the Connections, resources, the Secret.
- A pod's or a container's exit code goes through the DAG's one policy (2/3/6 never retried; 4/5/143 retried).
- The Docker variant runs for real under dag.test() through podman's Docker-compatible socket: a stand-in image
  (busybox) where podman is installed, and the project's image on the demo catalog where it is built.
- moto on loopback and an Airflow Connection: the night's tables land in S3 with the Connection's keys, which
  never appear on a command line or in the log.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

pytest.importorskip("airflow.sdk", reason="Airflow is not installed here; `make test-airflow` runs this in .venv-airflow")

from airflow.sdk.exceptions import AirflowException, AirflowFailException  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
KEY_ID, SECRET = "AKIAFASHIONTEST", "wJalr-sekret-only-in-the-connection"
IMAGE = os.environ.get("FT_IMAGE", "localhost/fashion-tagger:latest")
STAND_IN = "localhost/fashion-tagger-stand-in:test"


def _dag_module(name: str = "fashion_tagger_image_under_test"):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "dags" / "fashion_tagger.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def module(airflow_db):
    return _dag_module()


def _night(date: str) -> datetime:
    return datetime.fromisoformat(date).replace(hour=2, tzinfo=timezone.utc)


def _states(dag_run) -> dict[tuple[str, int], tuple[str, int]]:
    return {(ti.task_id, ti.map_index): (str(ti.state), ti.try_number) for ti in dag_run.get_task_instances()}


def _connection(monkeypatch, conn_id: str, **fields) -> None:
    """An Airflow Connection, as a deployment's secrets backend or AIRFLOW_CONN_* would hold it."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))


def _shape(task) -> dict:
    return {"upstream": sorted(task.upstream_task_ids), "timeout": task.execution_timeout, "retries": task.retries,
            "backoff": task.retry_exponential_backoff, "max_delay": task.max_retry_delay, "pool": task.pool,
            "pool_slots": task.pool_slots, "outlets": [a.name for a in task.outlets],
            "on_failure": task.on_failure_callback}


def test_the_three_ways_share_steps_pool_asset_timeouts_and_retries(module, monkeypatch):
    monkeypatch.setenv("FASHION_TAGGER_POOL", "fashion_tagger")
    module = _dag_module()
    dags = {run_in: module.build_dag(run_in) for run_in in module.RUN_IN_CHOICES}
    process = dags["process"]
    for run_in, dag in dags.items():
        assert set(dag.task_ids) == {"plan", "tag_shard", "finalize", "report"}, run_in
        assert dag.dagrun_timeout == process.dagrun_timeout and dag.max_active_runs == 1
        assert type(dag.timetable).__name__ == "CronTriggerTimetable" and set(dag.params) == set(process.params)
        for task_id in dag.task_ids:
            assert _shape(dag.get_task(task_id)) == _shape(process.get_task(task_id)), (run_in, task_id)
    assert dags["process"].get_task("tag_shard").pool == "fashion_tagger"
    assert dags["kubernetes"].get_task("plan").operator_name == "TaggerPod"
    assert dags["docker"].get_task("plan").operator_name == "TaggerContainer"
    with pytest.raises(ValueError, match="FASHION_TAGGER_RUN_IN"):
        monkeypatch.setenv("FASHION_TAGGER_RUN_IN", "lambda")
        _dag_module()


def _config(module, **overrides) -> dict:
    conf = {"catalog": "s3://feeds/catalog/{{ ds }}/catalog.parquet", "model": "s3://models/fashion-lite0",
            "out": "s3://tags/nightly", "threads": 2, "workers": 1, **overrides}
    return module.resolve_config(conf, "2026-11-27")


def test_the_pod_spec_rendered_offline(module, monkeypatch):
    monkeypatch.setenv("FASHION_TAGGER_IMAGE", "registry.example.com/fashion-tagger:1.4")
    monkeypatch.setenv("FASHION_TAGGER_NAMESPACE", "tagging")
    monkeypatch.setenv("FASHION_TAGGER_K8S_SECRET", "fashion-tagger-extra")
    monkeypatch.setenv("FASHION_TAGGER_POD_MEMORY", "6Gi")
    _connection(monkeypatch, "ft_aws", conn_type="aws", login=KEY_ID, password=SECRET,
                extra={"region_name": "eu-west-1", "endpoint_url": "https://s3.eu-west-1.amazonaws.com"})
    _connection(monkeypatch, "ft_cdn", conn_type="http", host="cdn.example.com",
                extra={"headers": {"Authorization": "Bearer cdn-sekret"}})
    module = _dag_module()
    Pod = module.step_operator("kubernetes")
    config = _config(module, aws_conn_id="ft_aws", cdn_conn_id="ft_cdn")
    env = module.tagger_environment(config)

    pods = {}
    for step, shard in (("plan", None), ("shard", "1/4"), ("finalize", None), ("report", None)):
        operator = Pod(task_id=f"render_{step}", step=step, config=config, shard=shard)
        args = module.step_args(step, config, shard)
        operator.prepare(args, env, config)
        pods[step] = operator.build_pod_request_obj(dry_run=True)

    for step, pod in pods.items():
        container = pod.spec.containers[0]
        assert container.image == "registry.example.com/fashion-tagger:1.4" and not container.command  # entry point: tagger
        assert pod.metadata.namespace == "tagging" and pod.metadata.labels["fashion-tagger/step"] == step
        assert pod.spec.termination_grace_period_seconds == module.STOP_GRACE_SECONDS
        env_vars = {e.name: e.value for e in container.env}
        assert env_vars == {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
                            "AWS_DEFAULT_REGION": "eu-west-1", "AWS_ENDPOINT_URL": "https://s3.eu-west-1.amazonaws.com",
                            "TAGGER_ALLOW_HOSTS": "cdn.example.com",
                            "TAGGER_HTTP_HEADERS": '{"Authorization": "Bearer cdn-sekret"}'}, step
        assert [source.secret_ref.name for source in container.env_from] == ["fashion-tagger-extra"]
        assert not any(SECRET in arg or "cdn-sekret" in arg for arg in container.args)
        assert container.resources.limits == {"memory": "6Gi"}

    shard = pods["shard"].spec.containers[0]
    assert shard.args == ["tag", "--catalog", "s3://feeds/catalog/2026-11-27/catalog.parquet", "--model",
                          "s3://models/fashion-lite0", "--out", "s3://tags/nightly", "--run-date", "2026-11-27",
                          "--progress", "none", "--since", "s3://tags/nightly", "--shard", "1/4", "--threads", "2",
                          "--workers", "1"]
    assert shard.resources.requests == {"cpu": "3", "memory": "6Gi"}  # threads + workers: the pool's arithmetic
    assert pods["plan"].spec.containers[0].args[-1] == "--plan-only"
    assert pods["finalize"].spec.containers[0].args == ["finalize", "--out", "s3://tags/nightly", "--run-date", "2026-11-27"]
    assert pods["report"].spec.containers[0].args[:1] == ["report"]


class _Terminated:
    def __init__(self, code):
        from kubernetes.client import models as k8s

        self.status = k8s.V1PodStatus(phase="Failed", container_statuses=[k8s.V1ContainerStatus(
            name="base", image="i", image_id="", ready=False, restart_count=0,
            state=k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=code)))])


@pytest.mark.parametrize("code, retried", [(2, False), (3, False), (6, False), (4, True), (5, True), (143, True),
                                           (1, True)])
def test_a_pods_exit_code_goes_through_the_dags_policy(module, monkeypatch, code, retried):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    def provider_cleanup(self, pod, remote_pod, *args, **kwargs):  # the provider's verdict on a failed pod
        raise AirflowException(f"Pod {pod.metadata.name} returned a failure.")

    monkeypatch.setattr(KubernetesPodOperator, "cleanup", provider_cleanup)
    operator = module.step_operator("kubernetes")(task_id="t", step="report", planned=[{"config": {}}])
    pod = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="fashion-tagger-report-x1"))
    with pytest.raises(AirflowException) as raised:
        operator.cleanup(pod, _Terminated(code))
    assert isinstance(raised.value, AirflowFailException) is not retried
    assert f"pod fashion-tagger-report-x1 exited {code}" in str(raised.value)
    with pytest.raises(AirflowException, match="returned a failure"):  # no exit code (never started): as the provider says
        operator.cleanup(pod, k8s.V1Pod(status=k8s.V1PodStatus(phase="Pending")))


def test_connections_are_checked_and_refused_by_name(module, monkeypatch):
    _connection(monkeypatch, "ft_role", conn_type="aws", extra={"role_arn": "arn:aws:iam::1:role/x"})
    with pytest.raises(AirflowFailException, match="extra role_arn is not handed to the job"):
        module.tagger_environment(_config(module, aws_conn_id="ft_role"))
    _connection(monkeypatch, "ft_half", conn_type="aws", login=KEY_ID)
    with pytest.raises(AirflowFailException, match="set both login"):
        module.tagger_environment(_config(module, aws_conn_id="ft_half"))
    with pytest.raises(AirflowFailException, match="'ft_missing' cannot be read"):
        module.tagger_environment(_config(module, aws_conn_id="ft_missing"))
    _connection(monkeypatch, "ft_nohost", conn_type="http")
    with pytest.raises(AirflowFailException, match="no host"):
        module.tagger_environment(_config(module, cdn_conn_id="ft_nohost"))
    _connection(monkeypatch, "ft_cdn2", conn_type="http", extra={"allow_hosts": ["a.example.com", "*.b.example.com"],
                                                                  "allow_plain_http": True})
    assert module.tagger_environment(_config(module, cdn_conn_id="ft_cdn2")) == {
        "TAGGER_ALLOW_HOSTS": "a.example.com *.b.example.com", "TAGGER_ALLOW_PLAIN_HTTP": "1"}


# -- moto and an Airflow Connection, the real job ------------------------------------------------------------
@pytest.fixture()
def job():
    paths = {name: os.environ.get(f"FT_{name.upper()}") for name in ("tagger", "python", "catalog", "model")}
    if not all(paths.values()):
        pytest.skip("FT_TAGGER, FT_PYTHON, FT_CATALOG, FT_MODEL not set: run `make test-airflow`, which passes them")
    return {k: os.path.abspath(v) for k, v in paths.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def moto_s3(job):
    """moto's S3 server on 127.0.0.1, run by the job's python (moto is a test dependency of the job)."""
    port = _free_port()
    server = subprocess.Popen([job["python"], "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(urllib.request.Request(f"{url}/nightly-tags", method="PUT"), timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("moto did not start")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _small_catalog(job: dict, path: Path, rows: int = 12) -> Path:
    lines = Path(job["catalog"]).read_text().splitlines()
    base = Path(job["catalog"]).parent
    header, body = lines[0].split(","), lines[1:rows + 1]
    image = header.index("image")
    out = [lines[0]]
    for line in body:
        cells = line.split(",")
        cells[image] = str((base / cells[image]).resolve())
        out.append(",".join(cells))
    path.write_text("\n".join(out) + "\n")
    return path


def test_aws_keys_from_a_connection_reach_the_tagger_as_its_environment_only(job, moto_s3, module, monkeypatch,
                                                                           tmp_path, capfd, caplog):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)  # the worker has no AWS credentials of its own
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    _connection(monkeypatch, "ft_s3", conn_type="aws", login=KEY_ID, password=SECRET,
                extra={"region_name": "us-east-1", "endpoint_url": moto_s3})
    seen = tmp_path / "seen"
    wrapper = tmp_path / "tagger"
    wrapper.write_text(f"""#!/bin/sh
echo "args: $*" >> {seen}
[ "$AWS_ACCESS_KEY_ID" = {KEY_ID} ] && [ "$AWS_SECRET_ACCESS_KEY" = {SECRET} ] && echo "env: keys" >> {seen}
exec {job['tagger']} "$@"
""")
    wrapper.chmod(0o755)
    conf = {"tagger": str(wrapper), "catalog": str(_small_catalog(job, tmp_path / "catalog.csv")),
            "model": job["model"], "out": "s3://nightly-tags/out", "num_shards": 1, "threads": 1, "workers": 0,
            "aws_conn_id": "ft_s3"}
    run = _dag_module().fashion_tagger_dag.test(logical_date=_night("2026-11-20"), run_conf=conf)
    states = _states(run)
    assert str(run.state) == "success", states

    listing = subprocess.run([job["python"], "-c", (
        "import boto3, json; s3 = boto3.client('s3', endpoint_url=%r, region_name='us-east-1', "
        "aws_access_key_id='reader', aws_secret_access_key='reader'); "
        "print(json.dumps([o['Key'] for o in s3.list_objects_v2(Bucket='nightly-tags')['Contents']]))") % moto_s3],
        capture_output=True, text=True, timeout=120, check=True).stdout
    keys = json.loads(listing)
    for table in ("tags", "errors"):
        assert f"out/{table}/run_date=2026-11-20/_SUCCESS" in keys, keys
    assert "out/_reports/run_date=2026-11-20/report.html" in keys, keys
    lines = seen.read_text().splitlines()
    assert sum(line.startswith("args: ") for line in lines) == 4 and lines.count("env: keys") == 4, lines
    assert not any(SECRET in line or KEY_ID in line for line in lines if line.startswith("args: "))
    output = capfd.readouterr()
    log = output.out + output.err + caplog.text
    assert SECRET not in log
    assert "tagger environment from Airflow Connections: AWS_ACCESS_KEY_ID" in log  # the names are said, never the values


# -- the Docker variant for real, through podman's Docker-compatible socket ------------------------------------
def _podman() -> list[str]:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (`make image-tools` installs it): the Docker variant was not run here")
    return ["podman", "--runtime", "runc"]


@pytest.fixture(scope="module")
def podman_socket(tmp_path_factory):
    """`podman system service` on a unix socket of its own, stopped after the module."""
    podman = _podman()
    sock = tmp_path_factory.mktemp("podman") / "podman.sock"
    env = {**os.environ, "CONTAINERS_CONF": str(REPO / "container" / "containers.conf")}
    service = subprocess.Popen([*podman, "system", "service", "--time=0", f"unix://{sock}"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        if sock.exists():
            break
        time.sleep(0.1)
    else:
        service.kill()
        pytest.skip(f"podman system service did not start: {service.stderr.read()[-500:]}")
    yield f"unix://{sock}", env
    service.terminate()
    service.wait(timeout=30)


@pytest.fixture(scope="module")
def stand_in_image(podman_socket):
    """A busybox image whose entry point `tagger` says what it got and exits as told (TAGGER_EXIT_<step>)."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed (apt-get install busybox-static): no stand-in image to run")
    _, env = podman_socket
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"ft-stand-in-{os.getpid()}"
    (root / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    for tool in ("sh", "echo", "cat", "env", "grep", "sleep"):
        if not (root / "bin" / tool).exists():
            (root / "bin" / tool).symlink_to("busybox")
    (root / "bin" / "tagger").write_text("""#!/bin/sh
echo "tagger $*"
env | grep -q '^AWS_SECRET_ACCESS_KEY=' && echo "has: AWS_SECRET_ACCESS_KEY"
[ -n "$TAGGER_SLEEP" ] && [ "$1" = report ] && { trap 'echo stopped; exit 143' TERM; sleep "$TAGGER_SLEEP" & wait; }
case "$1" in report) exit ${TAGGER_EXIT_REPORT:-0};; esac
exit 0
""")
    (root / "bin" / "tagger").chmod(0o755)
    tar = subprocess.run(["tar", "-C", str(root), "-c", "."], capture_output=True, check=True).stdout
    subprocess.run([*_podman(), "import", "--change", 'ENTRYPOINT ["/bin/tagger"]', "--change", "ENV PATH=/bin", "-",
                    STAND_IN], input=tar, env=env, capture_output=True, check=True)
    shutil.rmtree(root, ignore_errors=True)
    yield STAND_IN
    # Removed afterwards, so that the next run's import leaves no dangling <none> image behind.
    subprocess.run([*_podman(), "rmi", "-f", STAND_IN], env=env, capture_output=True)


def _docker_dag(monkeypatch, socket_url: str, image: str, mounts: str = ""):
    monkeypatch.setenv("FASHION_TAGGER_RUN_IN", "docker")
    monkeypatch.setenv("FASHION_TAGGER_IMAGE", image)
    monkeypatch.setenv("FASHION_TAGGER_DOCKER_URL", socket_url)
    monkeypatch.setenv("FASHION_TAGGER_DOCKER_NETWORK", "none")
    monkeypatch.setenv("FASHION_TAGGER_DOCKER_MOUNTS", mounts)
    monkeypatch.setenv("FASHION_TAGGER_DOCKER_USER", "0")
    return _dag_module().fashion_tagger_dag


def test_the_docker_variant_runs_the_four_steps_in_containers(airflow_db, podman_socket, stand_in_image, monkeypatch,
                                                              tmp_path, capfd, caplog):
    """dag.test() with each task a container of the stand-in image: the arguments as its command, the
    Connection's keys in its environment, and nothing of the worker's own environment."""
    socket_url, _ = podman_socket
    _connection(monkeypatch, "ft_docker_aws", conn_type="aws", login=KEY_ID, password=SECRET)
    dag = _docker_dag(monkeypatch, socket_url, stand_in_image)
    conf = {"catalog": "s3://feeds/{{ ds }}/catalog.csv", "model": "s3://models/m", "out": "s3://tags/out",
            "num_shards": 2, "threads": 1, "workers": 1, "aws_conn_id": "ft_docker_aws", "report_max_drift": 0.2,
            "report_args": "--gallery 0"}
    monkeypatch.setenv("TAGGER_EXIT_REPORT", "6")  # the worker's: not handed to the container (else exit 6)
    run = dag.test(logical_date=_night("2026-11-21"), run_conf=conf)
    states = _states(run)
    output = capfd.readouterr()
    log = output.out + output.err + caplog.text
    assert str(run.state) == "success", states
    assert all(state == "success" for state, _ in states.values()), states
    assert set(states) == {("plan", -1), ("tag_shard", 0), ("tag_shard", 1), ("finalize", -1), ("report", -1)}
    assert "tagger tag --catalog s3://feeds/2026-11-21/catalog.csv" in log and "--plan-only" in log
    assert "--shard 0/2 --threads 1 --workers 1" in log and "--shard 1/2 --threads 1 --workers 1" in log
    assert "tagger report --out s3://tags/out --run-date 2026-11-21 --max-drift 0.2 --gallery 0" in log
    assert log.count("has: AWS_SECRET_ACCESS_KEY") >= 5 and SECRET not in log


def test_the_docker_variants_exit_codes_and_stop(airflow_db, podman_socket, stand_in_image, monkeypatch):
    socket_url, _ = podman_socket
    module = _dag_module()
    monkeypatch.setenv("FASHION_TAGGER_IMAGE", stand_in_image)
    monkeypatch.setenv("FASHION_TAGGER_DOCKER_URL", socket_url)
    monkeypatch.setenv("FASHION_TAGGER_DOCKER_NETWORK", "none")
    Container = module.step_operator("docker")
    config = _config(module, report_args="--gallery 0")
    for code, retried in ((6, False), (2, False), (4, True), (143, True)):
        operator = Container(task_id=f"report_{code}", step="report", planned=[{"config": config}],
                             image=stand_in_image, docker_url=socket_url)
        with pytest.raises(AirflowException) as raised:
            operator.run_step(module.step_args("report", config), {"TAGGER_EXIT_REPORT": str(code)}, config, {})
        assert isinstance(raised.value, AirflowFailException) is not retried, code
        assert f"container exited {code}" in str(raised.value)
    # An execution timeout while the container runs: SIGTERM (the job stops at its next batch), then removed.
    operator = Container(task_id="report_stop", step="report", planned=[{"config": config}], image=stand_in_image,
                         docker_url=socket_url)

    class Timeout(Exception):
        pass

    import signal

    previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(Timeout()))
    signal.alarm(8)
    try:
        with pytest.raises(Timeout):
            operator.run_step(module.step_args("report", config), {"TAGGER_SLEEP": "120"}, config, {})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    gone = subprocess.run([*_podman(), "ps", "-a", "--format", "{{.ID}}"], capture_output=True, text=True,
                          env=podman_socket[1]).stdout
    assert operator.container["Id"][:12] not in gone


def test_the_docker_variant_tags_the_demo_catalog_with_the_image(airflow_db, podman_socket, monkeypatch, job, tmp_path):
    """The project's image (`make image`) on the demo catalog under dag.test(): every task succeeds and both
    tables are committed. Skipped where the image is not built (a cold build: ~15 min, ~3.5 GB of wheels)."""
    _, env = podman_socket
    if subprocess.run([*_podman(), "image", "exists", IMAGE], env=env).returncode != 0:
        pytest.skip(f"the image {IMAGE} is not built here (`make image`: ~15 min and ~3.5 GB of downloads from "
                    "a cold cache); the Docker variant ran with a stand-in image only")
    out = tmp_path / "out"
    out.mkdir()
    mounts = f"{Path(job['catalog']).parent}:ro,{job['model']}:ro,{out}"
    dag = _docker_dag(monkeypatch, podman_socket[0], IMAGE, mounts)
    conf = {"catalog": job["catalog"], "model": job["model"], "out": str(out), "num_shards": 2, "shard_size": 50,
            "threads": 1, "workers": 1}
    run = dag.test(logical_date=_night("2026-11-22"), run_conf=conf)
    states = _states(run)
    assert str(run.state) == "success", states
    for table in ("tags", "errors"):
        assert (out / table / "run_date=2026-11-22" / "_SUCCESS").is_file()
    summary = json.loads((out / "_runs" / "run_date=2026-11-22" / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["rows"] == summary["tagged"] + summary["errors"]
