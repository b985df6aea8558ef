"""infra/'s cluster files declare what the code asks for: in the Ray launcher config and the KubeRay manifest, as
Ray's own autoscaler reads them, a worker type per pool of workers/pools.py offering the resource that pool asks for and
a head that runs no Ray work; the pinned versions; shell that parses; no secret in plain text; servers on loopback
(compose) or inside the cluster (Kubernetes); and a Prefect deployment (infra/prefect-cluster.yaml) that joins it."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config as validate_launcher_config

from vidopt.config import load_config
from workers.pools import POOL_RESOURCES, RESOURCE_NAMES

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
LAUNCHER, KUBERAY = INFRA / "ray-cluster.yaml", INFRA / "kuberay.yaml"
COMPOSE, CLUSTER_DEPLOYMENT = INFRA / "compose.yaml", INFRA / "prefect-cluster.yaml"
MANIFESTS = ["launcher", "kuberay"]
ACCELERATORS = {target: name for target, name in RESOURCE_NAMES.items() if target != "cpu"}
TPU_SLICE_HEAD = re.compile(r"TPU-.+-head")  # Ray's autoscaler adds it to a GKE TPU group: one per TPU slice
NOT_CUSTOM = {"CPU", "memory", "object_store_memory"}
CHECKOUT = "/home/ray/vidopt"  # ~/vidopt in the rayproject/ray images (user ray)


def pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(d.split(";")[0].strip().split("==") for d in deps if "==" in d)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def k8s_objects() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(KUBERAY.read_text()) if doc]


def raycluster() -> dict:
    [cluster] = [o for o in k8s_objects() if o["kind"] == "RayCluster"]
    return cluster


def ray_groups() -> dict[str, dict]:
    spec = raycluster()["spec"]
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}


def node_types(manifest: str) -> dict[str, dict]:
    """Node types as Ray's autoscaler reads the manifest (validated against Ray's schema); the head is "head"."""
    if manifest == "launcher":
        config = prepare_config(load(LAUNCHER))
        validate_launcher_config(config)
        head = config["head_node_type"]
    else:
        config = _derive_autoscaling_config_from_ray_cr(raycluster())
        head = "headgroup"
    return {("head" if name == head else name): t for name, t in config["available_node_types"].items()}


def pool_ask(target: str) -> dict[str, float]:
    """What an actor of the pool asks Ray for, in Ray's resource names (an actor's num_cpus defaults to 1)."""
    spec = POOL_RESOURCES[target]
    ask = {"CPU": spec.get("num_cpus", 1), "GPU": spec.get("num_gpus", 0), **spec.get("resources", {})}
    return {name: amount for name, amount in ask.items() if amount}


def cluster_deployment() -> dict:
    [spec] = load(CLUSTER_DEPLOYMENT)["deployments"]
    return spec


def cluster_config():
    """The PipelineConfig the cluster deployment's runs resolve: its profile plus its overrides."""
    parameters = cluster_deployment()["parameters"]
    return load_config(parameters["profile"], parameters["overrides"])


@pytest.mark.parametrize("manifest", MANIFESTS)
def test_each_pool_has_a_worker_type_offering_what_it_asks(manifest):
    types = node_types(manifest)
    assert set(types) == {"head", *POOL_RESOURCES}, f"{manifest}: node types {sorted(types)}"
    for target in POOL_RESOURCES:
        ask, offered = pool_ask(target), types[target]["resources"]
        assert RESOURCE_NAMES[target] in ask, f"workers.pools: the {target} pool does not ask for its own resource"
        assert all(offered.get(name, 0) >= amount for name, amount in ask.items()), \
            f"{manifest}: node type {target} offers {offered}, its pool asks for {ask}"
        custom = {name for name in offered if name not in NOT_CUSTOM and not TPU_SLICE_HEAD.fullmatch(name)}
        assert custom == ({ACCELERATORS[target]} if target in ACCELERATORS else set()), \
            f"{manifest}: node type {target} declares {sorted(custom)}, not exactly its pool's accelerator"


@pytest.mark.parametrize("manifest", MANIFESTS)
def test_head_runs_no_ray_work(manifest):
    head = node_types(manifest)["head"]["resources"]
    assert head.get("CPU") == 0 and not set(head) & set(ACCELERATORS.values()), f"{manifest}: head offers {head}"
    if manifest == "launcher":  # the autoscaler plans with `resources`; the node offers what `ray start` says
        assert any("ray start --head" in c and "--num-cpus=0" in c for c in load(LAUNCHER)["head_start_ray_commands"])


@pytest.mark.parametrize("manifest", MANIFESTS)
def test_every_pool_is_up_before_export_looks_for_it(manifest):
    # workers/pools.py skips a target whose resource no *running* node offers: autoscaling from 0 would skip it
    types = node_types(manifest)
    assert {t: types[t]["min_workers"] for t in POOL_RESOURCES} == {t: 1 for t in POOL_RESOURCES}


@pytest.mark.parametrize("manifest", MANIFESTS)
def test_gpu_type_holds_the_cluster_deployments_training_workers(manifest):
    gpu = node_types(manifest)["gpu"]
    workers = cluster_config().train.workers
    assert gpu["max_workers"] * gpu["resources"]["GPU"] >= workers >= 2, "DDP needs a GPU per training worker"


def test_kuberay_groups_get_accelerators_from_their_device_plugins():
    groups = ray_groups()
    limits = {name: g["template"]["spec"]["containers"][0]["resources"]["limits"] for name, g in groups.items()}
    assert int(limits["gpu"]["nvidia.com/gpu"]) >= 1
    assert int(limits["tpu"]["google.com/tpu"]) >= 1 and "nvidia.com/gpu" not in limits["tpu"]
    assert {"cloud.google.com/gke-tpu-accelerator", "cloud.google.com/gke-tpu-topology"} <= \
        set(groups["tpu"]["template"]["spec"]["nodeSelector"])  # GKE schedules TPU pods only with both
    assert not any(k.endswith("/gpu") or k.endswith("/tpu") for name in ("head", "cpu", "fpga") for k in limits[name])


def test_ray_images_carry_the_pinned_ray_and_python():
    launcher, ray = load(LAUNCHER), pins()["ray"]
    images = {"launcher": launcher["docker"]["image"], "launcher gpu":
              launcher["available_node_types"]["gpu"]["docker"]["worker_image"]}
    images |= {f"kuberay {name}": g["template"]["spec"]["containers"][0]["image"] for name, g in ray_groups().items()}
    for where, image in images.items():
        repository, tag = image.split(":")
        assert repository == "rayproject/ray" and tag.startswith(f"{ray}-py311"), f"{where}: {image}"
        assert tag.endswith("-cu128") == where.endswith("gpu"), f"{where}: {image} (CUDA images on GPU nodes only)"
    assert raycluster()["spec"]["rayVersion"] == ray


def test_server_images_carry_the_client_pins():
    compose, p = load(COMPOSE)["services"], pins()
    k8s = {o["metadata"]["name"]: o["spec"]["template"]["spec"]["containers"][0]["image"]
           for o in k8s_objects() if o["kind"] == "Deployment"}
    for images in ({n: compose[n]["image"] for n in ("mlflow", "prefect")}, k8s):
        assert images == {"mlflow": f"ghcr.io/mlflow/mlflow:v{p['mlflow']}-full",
                          "prefect": f"prefecthq/prefect:{p['prefect']}-python3.11"}


def shell_scripts() -> dict[str, str]:
    """Every shell line the files hand to bash: launcher commands, KubeRay's `command` + `&& ulimit; ray start` (how
    KubeRay assembles a Ray container's args), compose's `sh -c` strings after compose turns $$ into $."""
    scripts, launcher = {}, load(LAUNCHER)
    sections = {k: v for k, v in launcher.items() if k.endswith("_commands")}
    for name, t in launcher["available_node_types"].items():
        sections |= {f"{name}.{k}": v for k, v in t.items() if k.endswith("_commands")}
    scripts |= {f"launcher {s}[{i}]": c for s, cmds in sections.items() for i, c in enumerate(cmds)}
    for name, g in ray_groups().items():
        container = g["template"]["spec"]["containers"][0]
        user = " ".join(container.get("command", []) + container.get("args", []))
        scripts[f"kuberay {name}"] = f"{user} && ulimit -n 65536; ray start --block"
    for name, service in load(COMPOSE)["services"].items():
        for key in ("command", "entrypoint"):
            if isinstance(service.get(key), list) and service[key][:2] == ["sh", "-c"]:
                scripts[f"compose {name}.{key}"] = service[key][2].replace("$$", "$")
    return scripts


def test_shell_in_the_files_parses():
    scripts = shell_scripts()
    assert len(scripts) >= 15 and any("prefect worker start" in s for s in scripts.values())
    for where, script in scripts.items():
        done = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
        assert done.returncode == 0, f"{where}: {done.stderr}\n{script}"


def test_every_ray_node_installs_the_checkout_the_deployment_runs_in():
    spec = cluster_deployment()
    [step] = load(CLUSTER_DEPLOYMENT)["pull"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == CHECKOUT
    launcher = prepare_config(load(LAUNCHER))
    per_node = {"launcher head": launcher["head_setup_commands"]}
    per_node |= {f"launcher {n}": t.get("worker_setup_commands", launcher["worker_setup_commands"])
                 for n, t in launcher["available_node_types"].items() if n != "head"}
    per_node |= {f"kuberay {n}": [" ".join(g["template"]["spec"]["containers"][0]["command"])]
                 for n, g in ray_groups().items()}
    # ... and on Kubernetes, a startup probe holds KubeRay's liveness probe off while it installs
    assert all("startupProbe" in g["template"]["spec"]["containers"][0] for g in ray_groups().values())
    for where, commands in per_node.items():
        text = " ; ".join(commands)
        assert "git clone" in text and re.search(r"pip install .*-e ~/vidopt", text), f"{where}: {commands}"
    # the repository to set is written once per file
    for path in (LAUNCHER, KUBERAY):
        assert len(set(re.findall(r"https://github\.com/\S+?\.git", path.read_text()))) == 1, path.name
    pool = spec["work_pool"]["name"]
    heads = [" ".join(launcher["head_start_ray_commands"]), " ".join(ray_groups()["head"]["template"]["spec"]
                                                                     ["containers"][0]["command"])]
    assert all(f"prefect worker start --pool {pool} --type process" in h for h in heads)


def test_cluster_deployment_reaches_the_servers_the_files_define():
    spec, config = cluster_deployment(), cluster_config()
    assert spec["entrypoint"] == "flows/pipeline.py:pipeline_from_profile"
    assert config.ray.address == "auto"
    assert config.run.artifact_root.startswith("s3://") and config.data.source.startswith("s3://")
    mlflow = urlsplit(config.tracking.uri)
    launcher, compose = load(LAUNCHER), load(COMPOSE)["services"]
    k8s_services = {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] == "Service"}
    [prefect_api] = [e["value"] for e in ray_groups()["head"]["template"]["spec"]["containers"][0]["env"]
                     if e["name"] == "PREFECT_API_URL"]
    assert prefect_api == "http://prefect:4200/api"  # the worker on the head, in both manifests
    assert f"prefect config set PREFECT_API_URL={prefect_api}" in launcher["head_setup_commands"]
    for host, port in ((mlflow.hostname, mlflow.port), ("prefect", 4200)):
        assert host in compose and f"127.0.0.1:{port}:{port}" in compose[host]["ports"]
        assert [p["port"] for p in k8s_services[host]["spec"]["ports"]] == [port]
        assert f"--add-host={host}:127.0.0.1" in launcher["docker"]["head_run_options"]  # compose on the head
    for flags in mlflow_servers().values():  # MLflow answers the Host header the flow sends
        assert mlflow.netloc in flags["--allowed-hosts"].split(",")


def test_cluster_deployment_is_the_gpu_profile_on_the_cluster():
    # only where things are on the cluster is overridden: the recipe is flows/configs/gpu.yaml's
    parameters = cluster_deployment()["parameters"]
    assert parameters["profile"] == "gpu"
    for override in parameters["overrides"]:
        key = override.partition("=")[0]
        assert key.split(".")[0] in ("ray", "train", "tracking") or key in ("run.project_dir", "run.artifact_root",
                                                                            "data.source"), override
    assert cluster_config().train.device == "gpu"


def mlflow_servers() -> dict[str, dict[str, str]]:
    """`mlflow server` flags of compose's and Kubernetes' MLflow, as {--flag: value}."""
    compose = load(COMPOSE)["services"]["mlflow"]["command"]
    [deployment] = [o for o in k8s_objects() if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    argvs = {"compose": shlex.split(compose[2].replace("$$", "$")),
             "kubernetes": container["command"] + container["args"]}
    servers = {}
    for where, argv in argvs.items():
        argv = argv[argv.index("mlflow") + 2:]  # after `mlflow server`
        flags = [a.split("=", 1) if "=" in a else [a, argv[i + 1]] for i, a in enumerate(argv) if a.startswith("--")]
        servers[where] = dict(flags)
    return servers


def test_mlflow_servers_keep_runs_in_postgres_and_artifacts_in_s3():
    for where, flags in mlflow_servers().items():
        backend = urlsplit(flags["--backend-store-uri"])
        assert backend.scheme.startswith("postgresql") and backend.password is None, f"{where}: {backend.geturl()}"
        assert flags["--artifacts-destination"].startswith("s3://"), where
        assert flags["--host"] == "0.0.0.0", f"{where}: listens on its container's / pod's network"


def test_compose_publishes_only_on_loopback():
    published = {}
    for name, service in load(COMPOSE)["services"].items():
        for port in service.get("ports", []):  # "HOST_IP:HOST_PORT:PORT", or the long form's host_ip
            parts = port.split(":") if isinstance(port, str) else [port.get("host_ip")]
            published.setdefault(name, set()).add(parts[0] if len(parts) in (1, 3) else None)  # None: every interface
    assert {"mlflow", "prefect"} <= set(published)
    assert set().union(*published.values()) == {"127.0.0.1"}, published


def test_compose_starts_servers_after_their_bucket_and_database_exist():
    services = load(COMPOSE)["services"]
    bucket = urlsplit(mlflow_servers()["compose"]["--artifacts-destination"]).netloc
    assert services["mlflow"]["depends_on"]["minio-init"] == {"condition": "service_completed_successfully"}
    assert f"mc mb --ignore-existing vidopt/{bucket}" in services["minio-init"]["entrypoint"][2]
    database = services["prefect"]["environment"]["PREFECT_SERVER_DATABASE_NAME"]
    assert services["prefect"]["depends_on"]["postgres-init"] == {"condition": "service_completed_successfully"}
    assert f'CREATE DATABASE {database}"' in services["postgres-init"]["command"][2]


def test_the_heads_generated_env_file_holds_every_variable_compose_reads():
    generate = next(c for c in load(LAUNCHER)["available_node_types"]["head"]["initialization_commands"]
                    if "infra/.env" in c and "openssl rand" in c)
    written = set(re.findall(r"echo (\w+)=", generate)) | set(re.search(r"for v in ([\w\s]+);", generate)[1].split())
    read = {}
    for name, service in load(COMPOSE)["services"].items():
        names = set(re.findall(r"\$\$\{?(\w+)", json.dumps(service)))
        if names:
            assert service.get("env_file") == ".env", f"{name} reads {names} but has no env_file"
            read[name] = names
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"} <= set().union(*read.values()) <= written


def test_kubernetes_servers_stay_inside_the_cluster():
    objects = k8s_objects()
    pods = [o["spec"]["template"]["metadata"]["labels"] for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    services = [o for o in objects if o["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"postgres", "mlflow", "prefect"}
    for service in services:
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
        assert service["spec"]["selector"] in pods, f"{service['metadata']['name']}: selects no pod"
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"vidopt"}


SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY", re.I)
REFERENCE = re.compile(r"""^["']?\$""")  # $VAR, ${VAR}, $$VAR (compose), $(VAR) (Kubernetes), "$VAR"
AWS_KEY_ID = re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")


def literal_secrets(node, where: str = "") -> list[str]:
    """Secret-looking values written out: under a secret-looking key or env name, after NAME= in a command, in a URI's
    user:password@, an AWS access key id, or a Kubernetes Secret object's data."""
    found = []
    if isinstance(node, dict):
        if node.get("kind") == "Secret" and (node.get("data") or node.get("stringData")):
            found.append(f"{where}: a Secret object with its data")
        if isinstance(node.get("name"), str) and SECRET_NAME.search(node["name"]) and "value" in node \
                and not REFERENCE.match(str(node["value"])):
            found.append(f"{where}: env {node['name']} has a literal value")
        for key, value in node.items():
            if SECRET_NAME.search(str(key)) and isinstance(value, (str, int)) and not REFERENCE.match(str(value)):
                found.append(f"{where}.{key}: literal value")
            found += literal_secrets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += literal_secrets(item, f"{where}[{i}]")
    elif isinstance(node, str):
        for name, value in re.findall(r"(\w*(?:PASSWORD|SECRET|TOKEN|ACCESS_KEY)\w*)=(\S+)", node, re.I):
            if not REFERENCE.match(value):
                found.append(f"{where}: {name}= is followed by a literal")
        if re.search(r"://[^/\s:@]+:[^/\s@]+@", node) or AWS_KEY_ID.search(node):
            found.append(f"{where}: a credential in {node[:80]!r}")
    return found


@pytest.mark.parametrize("path", sorted(INFRA.glob("*.yaml")), ids=lambda p: p.name)
def test_no_secret_in_plain_text(path):
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents and literal_secrets(documents, path.name) == []
    assert not AWS_KEY_ID.search(path.read_text()), f"{path.name}: an AWS access key id"


def test_the_secret_check_finds_literals():
    leaks = [{"environment": {"POSTGRES_PASSWORD": "hunter2hunter2"}},
             {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI/K7MDENG"}]},
             {"command": ["sh", "-c", "PGPASSWORD=hunter2 exec mlflow server"]},
             {"args": ["--backend-store-uri=postgresql://vidopt:hunter2@postgres/mlflow"]},
             {"node_config": {"UserData": "export AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP"}},
             {"kind": "Secret", "stringData": {"POSTGRES_PASSWORD": "x"}}]
    assert all(literal_secrets(leak) for leak in leaks)
    references = [{"environment": {"POSTGRES_PASSWORD": "${POSTGRES_PASSWORD}"}, "env_file": ".env"},
                  {"env": [{"name": "PGPASSWORD", "valueFrom": {"secretKeyRef": {"name": "s", "key": "PASSWORD"}}}]},
                  {"command": ["sh", "-c", 'PGPASSWORD="$$POSTGRES_PASSWORD" exec mlflow server']}]
    assert not any(literal_secrets(ok) for ok in references)


@pytest.mark.integration
def test_prefect_deploy_of_the_cluster_file_against_a_server(prefect_server, tmp_path):
    import httpx

    from tests.flows.test_serve import read_deployment

    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "home")}

    def prefect(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"prefect {' '.join(args)}: exit {done.returncode}\n{done.stdout[-3000:]}" \
                                     f"\n{done.stderr[-3000:]}"

    api, spec = httpx.Client(base_url=prefect_server, timeout=30), cluster_deployment()
    prefect("work-pool", "create", spec["work_pool"]["name"], "--type", "process")
    try:
        prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(CLUSTER_DEPLOYMENT.relative_to(REPO)))
        deployment = read_deployment(api, spec["name"])
        assert deployment["work_pool_name"] == spec["work_pool"]["name"]
        assert deployment["entrypoint"] == spec["entrypoint"]
        assert deployment["parameters"] == spec["parameters"]
        assert deployment["pull_steps"] == load(CLUSTER_DEPLOYMENT)["pull"]
        assert deployment["global_concurrency_limit"]["limit"] == 1
    finally:
        if deployment := read_deployment(api, spec["name"]):
            api.delete(f"/deployments/{deployment['id']}")
        api.delete(f"/work_pools/{spec['work_pool']['name']}")
