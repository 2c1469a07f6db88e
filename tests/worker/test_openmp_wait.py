"""worker/__main__.py: libgomp's threads spin a bounded count between parallel regions, then sleep,
unless the environment chose a policy or a spin count, and the choice is made before torch (and with it
libgomp, which reads it once) is loaded."""
import os
import subprocess
import sys

from pagedserve.worker.__main__ import DEFAULT_SPIN_COUNT, set_openmp_wait


def test_a_bounded_spin_unless_the_environment_chose():
    environ = {}
    set_openmp_wait(environ)
    assert environ == {"GOMP_SPINCOUNT": DEFAULT_SPIN_COUNT} == {"GOMP_SPINCOUNT": "10000"}
    for chosen in ({"OMP_WAIT_POLICY": "passive"}, {"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "0"}):
        environ = dict(chosen)
        set_openmp_wait(environ)
        assert environ == chosen


def test_set_before_torch_is_loaded():
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = ("import sys, os; import pagedserve.worker.__main__; "
            "print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", DEFAULT_SPIN_COUNT]


def test_the_start_up_log_names_the_wait(monkeypatch):
    from pagedserve.worker.model_runner import openmp_wait
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    assert openmp_wait() == "spin 1000 times, then sleep"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert openmp_wait() == "passive"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert openmp_wait() == "libgomp's default"
