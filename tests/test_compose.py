"""docker/compose.yaml and the Dockerfiles checked against the code, since no machine here runs a
Docker engine: every service's command parses with the real CLI's own argparse, the addresses
services give each other match the ports they listen on, health checks probe those ports with
pagedserve.entrypoints.healthcheck, GPU services reserve a GPU, and each profile has one worker per rank."""
from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
PROFILES = ("cpu", "gpu", "cpu-tp3")
MODULES = {"pagedserve.worker": "pagedserve.worker.__main__", "pagedserve.scheduler": "pagedserve.scheduler.__main__",
           "pagedserve.router": "pagedserve.router.__main__",
           "pagedserve.entrypoints.fetch_model": "pagedserve.entrypoints.fetch_model"}


class Parsed(Exception):
    """Raised in place of running a CLI, once argparse has accepted its arguments."""

    def __init__(self, namespace: argparse.Namespace):
        super().__init__()
        self.namespace = namespace


def parse_with_the_real_cli(main, argv: list[str]) -> argparse.Namespace:
    """Runs `main(argv)` up to its parse_args, which must accept argv; nothing else runs."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        raise Parsed(original(parser, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
        try:
            main(argv)
        except Parsed as parsed:
            return parsed.namespace
        except SystemExit as exit_:  # argparse refused an argument
            pytest.fail(f"{argv} is refused by the CLI (exit {exit_.code})")
    pytest.fail(f"{main.__module__}.main never parsed its arguments")


def module_args(command: list[str]) -> tuple[str, argparse.Namespace]:
    """`python -m MODULE ARGS...` parsed by MODULE's own main."""
    assert command[:2] == ["python", "-m"] and command[2] in MODULES, command
    module = importlib.import_module(MODULES[command[2]])
    role = command[2].removeprefix("pagedserve.") if command[2].count(".") == 1 else command[2]
    return role, parse_with_the_real_cli(module.main, command[3:])


def services(profile: str, role: str | None = None) -> dict[str, dict]:
    out = {}
    for name, service in SERVICES.items():
        if profile in service.get("profiles", PROFILES):
            if role is None or module_args(service["command"])[0] == role:
                out[name] = service
    return out


def args_of(service: dict) -> argparse.Namespace:
    return module_args(service["command"])[1]


def health_target(service: dict) -> tuple[str, str]:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD", "exec form: no shell in the image is needed"
    kind, target = test[-2:]
    # The probe runs pagedserve.entrypoints.healthcheck, which must accept exactly these arguments.
    assert test[1:-2] == ["python", "-m", "pagedserve.entrypoints.healthcheck"] and kind in ("grpc", "http")
    return kind, target


def seconds(duration: str) -> float:
    value = re.fullmatch(r"(\d+)(s|m)", duration)
    assert value, duration
    return int(value.group(1)) * (60 if value.group(2) == "m" else 1)


@pytest.mark.parametrize("name", list(SERVICES))
def test_every_command_parses_with_the_real_cli(name):
    module_args(SERVICES[name]["command"])


@pytest.mark.parametrize("profile", PROFILES)
def test_each_profile_has_router_scheduler_model_and_one_worker_per_rank(profile):
    assert len(services(profile, "router")) == len(services(profile, "scheduler")) == 1
    assert len(services(profile, "pagedserve.entrypoints.fetch_model")) == 1
    workers = [args_of(s) for s in services(profile, "worker").values()]
    assert sorted(w.rank for w in workers) == list(range(len(workers)))
    assert {w.world_size for w in workers} == {len(workers)}
    device = "cuda" if profile == "gpu" else "cpu"
    assert {w.device for w in workers} == {device}


@pytest.mark.parametrize("profile", PROFILES)
def test_addresses_between_services_match_their_ports(profile):
    (scheduler_name, scheduler), = services(profile, "scheduler").items()
    (_, router), = services(profile, "router").items()
    sched = args_of(scheduler)
    assert args_of(router).scheduler_addr == f"{scheduler_name}:{sched.port}"
    by_rank = {}
    for name, service in services(profile, "worker").items():
        args = args_of(service)
        assert args.host == "0.0.0.0", f"{name} must listen beyond its own container"
        names = [name, *service.get("networks", {}).get("default", {}).get("aliases", [])]
        by_rank[args.rank] = (names, args.port)
    addresses = sched.worker_addrs.split(",")
    assert len(addresses) == len(by_rank)
    for rank, address in enumerate(addresses):  # rank 0 first, as the scheduler requires
        host, port = address.rsplit(":", 1)
        names, listening = by_rank[rank]
        assert host in names and int(port) == listening
    assert sched.host == args_of(router).host == "0.0.0.0"


@pytest.mark.parametrize("name", [n for n, s in SERVICES.items() if "healthcheck" in s])
def test_health_checks_probe_the_port_the_service_listens_on(name):
    service = SERVICES[name]
    role, args = module_args(service["command"])
    kind, target = health_target(service)
    if role == "router":
        assert (kind, target) == ("http", f"http://127.0.0.1:{args.port}/health")
    else:
        assert (kind, target) == ("grpc", f"127.0.0.1:{args.port}")


def test_every_serving_service_has_a_health_check_and_restarts():
    for name, service in SERVICES.items():
        role = module_args(service["command"])[0]
        if role in ("worker", "scheduler", "router"):
            assert "healthcheck" in service, name
            assert service["restart"] == "unless-stopped", name


@pytest.mark.parametrize("profile", PROFILES)
def test_published_ports_are_the_router_and_scheduler_ports(profile):
    for name, service in services(profile).items():
        role = module_args(service["command"])[0]
        published = service.get("ports", [])
        if role in ("router", "scheduler"):
            port = args_of(service).port
            assert published == [f"{port}:{port}"], name
        else:
            assert not published, f"{name} needs no port outside the compose network"


@pytest.mark.parametrize("profile", PROFILES)
def test_shutdown_order_and_grace_cover_the_drain(profile):
    """compose stops dependents first: router, then scheduler, then workers. Each must get longer
    than its own --shutdown-timeout before Docker kills it."""
    (router_name, router), = services(profile, "router").items()
    (scheduler_name, scheduler), = services(profile, "scheduler").items()
    assert scheduler_name in router["depends_on"]
    workers = services(profile, "worker")
    assert set(workers) <= set(scheduler["depends_on"])
    for service in (router, scheduler):
        assert seconds(service["stop_grace_period"]) > args_of(service).shutdown_timeout


def test_model_volume_holds_the_model_every_service_loads():
    assert "models" in COMPOSE["volumes"]
    for profile in PROFILES:
        (_, fetch), = services(profile, "pagedserve.entrypoints.fetch_model").items()
        output = str(args_of(fetch).output)
        assert "models:/models" in fetch["volumes"]
        for name, service in services(profile).items():
            args = args_of(service)
            if getattr(args, "model", None):
                assert args.model == output, name
                assert "models:/models" in service["volumes"], name
                assert service["depends_on"].get("model") or \
                    module_args(service["command"])[0] == "router", name


def test_gpu_services_reserve_a_gpu_and_cpu_ones_do_not():
    for name, service in SERVICES.items():
        role, args = module_args(service["command"])
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get(
            "devices", [])
        if role == "worker" and args.device == "cuda":
            assert devices and devices[0]["capabilities"] == ["gpu"], name
            assert service["image"] == "pagedserve:cuda", name
        else:
            assert not devices, name


def test_images_build_from_dockerfiles_whose_files_exist():
    for name, service in SERVICES.items():
        build = service["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT, name
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), name
    for dockerfile in DOCKER.glob("Dockerfile*"):
        text = dockerfile.read_text()
        for line in text.splitlines():
            if line.startswith("COPY "):
                for source in shlex.split(line)[1:-1]:
                    assert (ROOT / source).exists(), f"{dockerfile.name}: {line}"
        cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
        argv = yaml.safe_load(cmd.group(1))
        assert argv[:2] == ["pagedserve", "serve"], dockerfile.name
        from pagedserve.entrypoints import cli
        args = parse_with_the_real_cli(cli.main, argv[1:])
        assert args.model == "/models/SmolLM2-135M-Instruct"
        check = re.search(r"^HEALTHCHECK .*CMD (\[.*\])$", text, re.M)
        assert check, f"{dockerfile.name} has no HEALTHCHECK"
        assert yaml.safe_load(check.group(1)) == [
            "python", "-m", "pagedserve.entrypoints.healthcheck", "http", f"http://127.0.0.1:{args.port}/health"]


def test_readme_shows_how_to_start_it():
    assert "docker compose -f docker/compose.yaml up" in (ROOT / "README.md").read_text()
    assert (DOCKER / ".env").read_text().count("COMPOSE_PROFILES=cpu") == 1


def test_compose_ranks_meet_at_rank_0():
    """docker/compose.yaml's tensor parallel profile: three ranks, rank 0 the meeting point."""
    workers = {args_of(s).rank: (name, args_of(s)) for name, s in services("cpu-tp3", "worker").items()}
    rank0_name = workers[0][0]
    assert len(workers) == 3 and {args.world_size for _, args in workers.values()} == {3}
    assert {args.dist_init_addr for _, args in workers.values()} == {f"{rank0_name}:29500"}
