"""deploy/'s Kubernetes manifests checked offline, since no cluster runs here: every object
validates against Kubernetes' own schemas (kubernetes-validate, strict: no unknown field), every
container's command parses with the real CLI's own argparse, and the ports, probes, names and
volumes they give each other are the ones the code serves: each process listens where its probes,
its containerPort and the Services point, the front router finds the schedulers through the
headless Service, the health probes hit what pagedserve serves (gRPC health on the workers and the
schedulers, /health on the routers), the GPU variant requests a GPU, and the autoscaler, the
disruption budgets and the volume name what exists."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from unittest import mock

import kubernetes_validate
import pytest
import yaml

from pagedserve.entrypoints import fetch_model
from pagedserve.router import __main__ as router_main
from pagedserve.scheduler import __main__ as scheduler_main
from pagedserve.worker import __main__ as worker_main

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
FILES = sorted(DEPLOY.glob("*.yaml"))
OBJECTS = [(path.name, obj) for path in FILES for obj in yaml.safe_load_all(path.read_text()) if obj]
ENGINES = ("engine-cpu.yaml", "engine-gpu.yaml")  # one of the two is applied


def objects(kind: str, file: str | None = None) -> list[dict]:
    return [o for f, o in OBJECTS if o["kind"] == kind and file in (None, f)]


def one(kind: str, name: str, file: str | None = None) -> dict:
    found = [o for o in objects(kind, file) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def containers(workload: dict) -> dict[str, dict]:
    return {c["name"]: c for c in workload["spec"]["template"]["spec"]["containers"]}


def parse(command: list[str]) -> tuple[str, object]:
    """(the module, its parsed flags) of `python -m MODULE ARGS...`, by MODULE's own parser."""
    assert command[:2] == ["python", "-m"], command
    module, argv = command[2], command[3:]
    parsers = {"pagedserve.worker": worker_main.parse_args,
               "pagedserve.scheduler": scheduler_main.parse_args,
               "pagedserve.router": router_main.parse_args}
    if module == "pagedserve.entrypoints.fetch_model":
        return module, fetch_parse(argv)
    assert module in parsers, f"unknown module {module}"
    try:
        return module, parsers[module](argv)
    except SystemExit as e:
        pytest.fail(f"{shlex.join(command)} is refused by its CLI (exit {e.code})")


class Parsed(Exception):
    """Raised in place of running a CLI, once argparse has accepted its arguments."""


def fetch_parse(argv: list[str]) -> argparse.Namespace:
    """fetch_model's flags, by its own parser: its main runs up to parse_args and no further."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        raise Parsed(original(parser, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
        try:
            fetch_model.main(argv)
        except Parsed as parsed:
            return parsed.args[0]
        except SystemExit as e:
            pytest.fail(f"fetch_model refuses {argv} (exit {e.code})")
    pytest.fail("fetch_model never parsed its arguments")


# ----- the schemas -------------------------------------------------------------------------------

@pytest.mark.parametrize("file, obj", OBJECTS, ids=[f"{f}:{o['kind']}/{o['metadata']['name']}"
                                                    for f, o in OBJECTS])
def test_every_object_is_valid_against_the_kubernetes_schemas(file, obj):
    kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def test_an_invalid_object_is_refused():  # the check above can fail
    bad = {**one("StatefulSet", "pagedserve-engine", "engine-cpu.yaml")}
    bad["spec"] = {**bad["spec"], "replica": 2}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


# ----- the engine replicas -----------------------------------------------------------------------

@pytest.mark.parametrize("file", ENGINES)
def test_each_engine_pod_is_a_worker_a_scheduler_and_a_router_that_find_each_other(file):
    engine = one("StatefulSet", "pagedserve-engine", file)
    c = containers(engine)
    assert set(c) == {"worker", "scheduler", "router"}
    _, worker = parse(c["worker"]["command"])
    _, scheduler = parse(c["scheduler"]["command"])
    _, router = parse(c["router"]["command"])
    assert (worker.rank, worker.world_size, worker.host) == (0, 1, "0.0.0.0")
    assert scheduler.worker_addrs == f"127.0.0.1:{worker.port}"  # the same pod
    assert router.scheduler_addr == f"127.0.0.1:{scheduler.port}"
    assert router.metrics_prefix == "vllm"  # what the autoscaler and vLLM's routers read
    assert scheduler.host == router.host == "0.0.0.0"  # probes and Services dial the pod's address
    assert scheduler.resume_timeout > 0
    for name, port in (("worker", worker.port), ("scheduler", scheduler.port),
                       ("router", router.port)):
        assert [p["containerPort"] for p in c[name]["ports"]] == [port], name
    # Probes: gRPC health on the worker; the scheduler ready on gRPC health (SERVING only while
    # its worker is) but alive on its port (so a lost worker does not restart it and lose the
    # requests it holds); the router ready on /health.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c["worker"][probe]["grpc"]["port"] == worker.port
    assert c["scheduler"]["readinessProbe"]["grpc"]["port"] == scheduler.port
    assert c["scheduler"]["livenessProbe"]["tcpSocket"]["port"] == scheduler.port
    assert c["router"]["readinessProbe"]["httpGet"] == {"path": "/health", "port": router.port}
    assert c["router"]["livenessProbe"]["tcpSocket"]["port"] == router.port
    grace = engine["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > max(scheduler.shutdown_timeout, router.shutdown_timeout)


def test_the_gpu_engine_requests_a_gpu_and_runs_cuda_and_the_cpu_one_does_not():
    gpu = containers(one("StatefulSet", "pagedserve-engine", "engine-gpu.yaml"))
    cpu = containers(one("StatefulSet", "pagedserve-engine", "engine-cpu.yaml"))
    assert gpu["worker"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert parse(gpu["worker"]["command"])[1].device == "cuda"
    assert gpu["worker"]["image"] == "pagedserve:cuda"
    assert parse(cpu["worker"]["command"])[1].device == "cpu"
    assert "limits" not in cpu["worker"]["resources"]
    # Everything else is the same.
    for name in ("scheduler", "router"):
        assert gpu[name] == cpu[name]


def test_the_headless_service_exposes_the_engine_ports_and_is_the_statefulsets():
    service = one("Service", "pagedserve-engine")
    assert service["spec"]["clusterIP"] == "None"
    for file in ENGINES:
        engine = one("StatefulSet", "pagedserve-engine", file)
        assert engine["spec"]["serviceName"] == service["metadata"]["name"]
        labels = engine["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert engine["spec"]["selector"]["matchLabels"].items() <= labels.items()
        c = containers(engine)
        served = {parse(c["scheduler"]["command"])[1].port, parse(c["router"]["command"])[1].port}
        assert {p["targetPort"] for p in service["spec"]["ports"]} == served


def test_the_front_router_finds_the_schedulers_through_the_headless_service():
    router = one("Deployment", "pagedserve-router")
    c = containers(router)["router"]
    command = c["command"]
    assert "--scheduler-addrs" in command  # the replicas' flag: a name it re-resolves
    addrs = command[command.index("--scheduler-addrs") + 1]
    host, port = addrs.rsplit(":", 1)
    service = one("Service", "pagedserve-engine")
    assert host == service["metadata"]["name"]
    engine_scheduler = parse(containers(one("StatefulSet", "pagedserve-engine",
                                            "engine-cpu.yaml"))["scheduler"]["command"])[1]
    assert int(port) == engine_scheduler.port
    assert {"name": "grpc", "port": int(port), "targetPort": int(port)} in service["spec"]["ports"]
    _, args = parse(command)
    assert args.scheduler_addrs == addrs and args.routing_policy == "cache_aware"
    assert [p["containerPort"] for p in c["ports"]] == [args.port]
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": args.port}
    front = one("Service", "pagedserve")
    assert front["spec"]["ports"][0]["targetPort"] == args.port
    assert front["spec"]["selector"].items() <= router["spec"]["template"]["metadata"]["labels"].items()


def test_health_routes_exist_where_the_probes_look():
    from pagedserve.router.app import build_app
    from pagedserve.router.settings import Settings
    paths = {route.path for route in build_app(Settings()).routes}
    assert "/health" in paths and "/metrics" in paths


# ----- the model volume, the autoscaler, the budgets ---------------------------------------------

def test_every_pod_mounts_the_model_volume_where_its_command_reads_the_model():
    claim = one("PersistentVolumeClaim", "pagedserve-models")["metadata"]["name"]
    job = one("Job", "pagedserve-fetch-model")
    written = parse(containers(job)["fetch-model"]["command"])[1].output
    for workload in [job, one("Deployment", "pagedserve-router"),
                     *(one("StatefulSet", "pagedserve-engine", f) for f in ENGINES)]:
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        for c in containers(workload).values():
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            module, args = parse(c["command"])
            model = getattr(args, "model", None) or getattr(args, "output", None)
            if model is None:
                continue  # the scheduler reads no model
            model = str(model)
            assert model == str(written)
            mount = next(p for p in mounts if model.startswith(p + "/"))
            assert volumes[mounts[mount]]["persistentVolumeClaim"]["claimName"] == claim


def test_the_autoscaler_scales_the_engines_on_vllms_queue_depth():
    hpa = one("HorizontalPodAutoscaler", "pagedserve-engine")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", "pagedserve-engine")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "vllm:num_requests_waiting"
    # The engine pods serve that name (their router runs --metrics-prefix vllm, checked above) on
    # the port Prometheus is told to scrape.
    for file in ENGINES:
        engine = one("StatefulSet", "pagedserve-engine", file)
        annotations = engine["spec"]["template"]["metadata"]["annotations"]
        router = parse(containers(engine)["router"]["command"])[1]
        assert int(annotations["prometheus.io/port"]) == router.port
        assert annotations["prometheus.io/path"] == "/metrics"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_the_disruption_budgets_select_the_pods_they_protect():
    for name, workloads in (("pagedserve-router", [one("Deployment", "pagedserve-router")]),
                            ("pagedserve-engine", [one("StatefulSet", "pagedserve-engine", f)
                                                   for f in ENGINES])):
        pdb = one("PodDisruptionBudget", name)
        for workload in workloads:
            labels = workload["spec"]["template"]["metadata"]["labels"]
            assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
