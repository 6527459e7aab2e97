"""Choosing the execution (vmap, unroll, ...) by measurement, and its cache on disk."""

import json
import os
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from _engine_fixtures import MLP, split

from crossbow_jax.engine.config import ConfigError, TrainConfig
from crossbow_jax.tuning import executions
from crossbow_jax.tuning.choice import OnlineExecutions
from crossbow_jax.tuning.executions import choose_execution, default_cache_dir, format_executions
from crossbow_jax.tuning.measure import Trial

TRAIN, _ = split(n_train=48, n_test=16)
CFG = TrainConfig(batch_size=8, num_devices=1, tune_steps=2, tune_repeats=1, progress=False)
CANDIDATES = ["vmap", "unroll"]


@pytest.fixture(scope="module")
def run():
    from crossbow_jax.engine.inputs import resolve

    return resolve(CFG, MLP(), TRAIN)  # model, data, mesh


class Fake:
    """A `measure` with fixed figures by execution (a number: images/s; a string: status;
    an exception: raised); counts its calls."""

    def __init__(self, figures):
        self.figures, self.calls = figures, []

    def __call__(self, cfg, model, optimizer, data, mesh, m, task):
        self.calls.append(cfg.execution)
        value = self.figures[cfg.execution]
        if isinstance(value, Exception):
            raise value
        if isinstance(value, str):
            return Trial(m, None, None, value, compile_seconds=0.2, error=f"{value} here")
        return Trial(m, value, 1000, "ok", 0.01, 0.5, 2)


def choose(run, fake, cache_dir, cfg=CFG, learners=2, **kw):
    model, data, mesh = run
    kw = {"candidates": CANDIDATES, "log": None, **kw}
    return choose_execution(cfg, model, None, data, mesh, learners=learners, measure=fake,
                            cache_dir=str(cache_dir), **kw)  # fmt: skip


def test_picks_the_fastest_and_reports_every_candidate(run, tmp_path):
    fake, lines = Fake({"vmap": 100.0, "unroll": 250.0}), []
    r = choose(run, fake, tmp_path, log=lines.append)
    assert r["chosen"] == "unroll" and r["learners"] == 2 and not r["cached"]
    assert [c["execution"] for c in r["candidates"]] == CANDIDATES == fake.calls
    assert r["candidates"][0] == {"execution": "vmap", "images_per_second": 100.0,
                                  "compile_seconds": 0.5, "status": "ok", "error": None}  # fmt: skip
    key = r["key"]
    assert (key["model"], key["batch_size"], key["learners"], key["devices"]) == ("MLP", 8, 2, 1)
    assert key["input_shape"] == [8] and key["platform"] == "cpu" and key["dtype"] == "float32"
    assert set(key["versions"]) == {"jax", "jaxlib", "flax", "optax", "crossbow-jax"}
    assert key["candidates"] == CANDIDATES and len(key["parameters"]) == 16
    assert os.path.dirname(r["cache_file"]) == str(tmp_path)
    assert json.loads(Path(r["cache_file"]).read_text())["chosen"] == "unroll"
    assert lines == format_executions(r).splitlines() and len(lines) == 4
    assert lines[2].rstrip().endswith("ok *") and "measured" in lines[-1]


def test_failures_are_skipped_and_all_failing_is_a_config_error(run, tmp_path):
    xla = jax.errors.JaxRuntimeError("UNIMPLEMENTED: no such kernel\nmore detail")
    r = choose(run, Fake({"vmap": "oom", "unroll": 50.0, "x": xla}), tmp_path,
               candidates=["vmap", "unroll"])  # fmt: skip
    assert r["chosen"] == "unroll" and r["candidates"][0]["status"] == "oom"
    assert r["candidates"][0]["images_per_second"] is None
    assert "oom here" in format_executions(r)

    bad = Fake({"vmap": "memory", "unroll": xla})
    with pytest.raises(ConfigError, match="no execution of vmap, unroll ran") as e:
        choose(run, bad, tmp_path / "other")
    assert "\n" not in str(e.value) and bad.calls == CANDIDATES
    assert not (tmp_path / "other").exists()  # a failure is not cached

    r = choose(run, Fake({"vmap": xla, "unroll": 10.0}), tmp_path / "third")
    assert r["candidates"][0]["status"] == "error"
    assert r["candidates"][0]["error"] == "JaxRuntimeError: UNIMPLEMENTED: no such kernel"
    # Any error of one candidate (im2col refusing a custom_vjp convolution, say) is its row.
    refused = ValueError("im2col: a convolution inside custom_vjp")
    r = choose(run, Fake({"vmap": refused, "unroll": 1.0}), tmp_path / "4")
    assert r["chosen"] == "unroll" and "custom_vjp" in r["candidates"][0]["error"]
    with pytest.raises(ConfigError, match="vmap: ValueError: im2col.*unroll: RuntimeError: bug"):
        choose(run, Fake({"vmap": refused, "unroll": RuntimeError("bug")}), tmp_path / "5")


def test_bad_candidate_lists_are_config_errors(run, tmp_path):
    for candidates in ([], ["auto", "vmap"], ["vmap", "nope"]):
        with pytest.raises(ConfigError):
            choose(run, Fake({}), tmp_path, candidates=candidates)
    default = list(executions.default_candidates())  # the config's, whatever they are now
    fake = Fake({e: float(i + 1) for i, e in enumerate(default)})
    r = choose(run, fake, tmp_path, candidates=None)
    assert [c["execution"] for c in r["candidates"]] == default == fake.calls
    assert {"vmap", "unroll"} <= set(default) and r["chosen"] == default[-1]
    assert "auto" not in r["key"]["candidates"]


def test_the_second_run_hits_the_cache_and_changes_miss(run, tmp_path):
    first = Fake({"vmap": 300.0, "unroll": 200.0})
    r1 = choose(run, first, tmp_path)
    again = Fake({"vmap": 1.0, "unroll": 2.0})  # would choose unroll if it were asked
    r2 = choose(run, again, tmp_path)
    assert again.calls == [] and r2["cached"] and r2["chosen"] == "vmap"
    assert r2["candidates"] == r1["candidates"] and r2["cache_file"] == r1["cache_file"]
    assert "cached in" in format_executions(r2)

    changes = [
        {"cfg": CFG.replace(batch_size=4)},
        {"learners": 3},
        {"cfg": CFG.replace(dtype="bfloat16")},
        {"cfg": CFG.replace(algorithm="ssgd")},
        {"candidates": ["unroll", "vmap"]},
    ]
    for change in changes:
        fake = Fake({"vmap": 1.0, "unroll": 2.0})
        r = choose(run, fake, tmp_path, **change)
        assert not r["cached"] and fake.calls and r["cache_file"] != r1["cache_file"], change
    assert len(list(tmp_path.glob("execution-*.json"))) == 1 + len(changes)
    assert not list(tmp_path.glob(".*"))  # no temporary files left

    none = Fake({"vmap": 1.0, "unroll": 2.0})
    r = choose(run, none, "")  # "": no cache at all
    assert r["cache_file"] is None and not r["cached"] and none.calls == CANDIDATES


@pytest.mark.parametrize("text", ["{not json", "", '{"key": 1}', "[]", '{"chosen": "vmap"}'])
def test_a_corrupt_cache_file_is_measured_again_and_overwritten(run, tmp_path, text):
    path = choose(run, Fake({"vmap": 3.0, "unroll": 2.0}), tmp_path)["cache_file"]
    with open(path, "w") as f:
        f.write(text)
    fake = Fake({"vmap": 1.0, "unroll": 2.0})
    r = choose(run, fake, tmp_path)
    assert fake.calls == CANDIDATES and not r["cached"] and r["chosen"] == "unroll"
    assert json.loads(Path(path).read_text())["chosen"] == "unroll"


def test_a_cache_file_for_another_key_is_not_used(run, tmp_path):
    path = choose(run, Fake({"vmap": 3.0, "unroll": 2.0}), tmp_path)["cache_file"]
    record = json.loads(Path(path).read_text())
    record["key"]["versions"]["jax"] = "0.0.1"  # e.g. a hash collision or a hand-copied file
    with open(path, "w") as f:
        json.dump(record, f)
    fake = Fake({"vmap": 1.0, "unroll": 2.0})
    assert not choose(run, fake, tmp_path)["cached"] and fake.calls == CANDIDATES


def test_an_unwritable_cache_never_fails_the_run(run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    folders = [blocker / "cache"]
    if os.geteuid() != 0:  # root writes anywhere: a read-only folder only binds others
        locked = tmp_path / "locked"
        locked.mkdir(0o500)
        folders.append(locked)
    for folder in folders:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(2):
                r = choose(run, Fake({"vmap": 1.0, "unroll": 2.0}), folder)
                assert r["chosen"] == "unroll" and r["cache_file"] is None and not r["cached"]
        assert len(seen) == 1 and "\n" not in str(seen[0].message)  # warned once, one line


def test_the_default_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("CROSSBOW_JAX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "crossbow_jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "crossbow_jax")
    monkeypatch.setenv("CROSSBOW_JAX_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == str(tmp_path / "mine")


def _as_process_1(monkeypatch, sent):
    """Makes this process process 1 of 2; process 0 broadcasts the objects `sent`, in order."""
    from jax.experimental import multihost_utils

    queue = []
    for obj in sent:
        data = np.frombuffer(json.dumps(obj).encode(), np.uint8).astype(np.int32)
        queue += [np.int32(len(data)), data]

    def broadcast(x):
        value = queue.pop(0)
        assert np.shape(x) == np.shape(value)  # the same shape on every process
        return value

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
    return queue


def test_other_processes_take_process_0s_decision(run, tmp_path, monkeypatch):
    record = choose(run, Fake({"vmap": 3.0, "unroll": 2.0}), tmp_path / "p0")
    stored = {"key": record["key"], "chosen": "vmap", "candidates": record["candidates"]}
    queue = _as_process_1(monkeypatch, [stored, None, "unroll"])

    fake = Fake({"vmap": 9.0, "unroll": 1.0})
    hit = choose(run, fake, tmp_path / "p1")  # process 0 had it: no trials here either
    assert hit["cached"] and hit["chosen"] == "vmap" and fake.calls == []
    assert hit["candidates"] == record["candidates"]

    miss = choose(run, fake, tmp_path / "p1")  # all measure; process 0's choice wins
    assert fake.calls == CANDIDATES and miss["chosen"] == "unroll" and not miss["cached"]
    assert queue == [] and not (tmp_path / "p1").exists()  # only process 0 writes


def test_a_real_measurement_of_vmap_and_unroll(run, tmp_path):
    from crossbow_jax.engine.checks import check_run

    cfg = CFG.replace(num_devices=2)
    from crossbow_jax.engine.inputs import resolve

    model, data, mesh = resolve(cfg, MLP(), TRAIN)
    task = check_run(cfg, model, None, data)
    r = choose_execution(cfg, model, None, data, mesh, task, learners=2, candidates=CANDIDATES,
                         log=None, cache_dir=str(tmp_path))  # fmt: skip
    rows = r["candidates"]
    assert [c["status"] for c in rows] == ["ok", "ok"]
    assert all(c["images_per_second"] > 0 and c["compile_seconds"] > 0 for c in rows)
    assert r["chosen"] == max(rows, key=lambda c: c["images_per_second"])["execution"]
    assert r["key"]["devices"] == 2 and not r["cached"]
    again = choose_execution(cfg, model, None, data, mesh, task, learners=2,
                             candidates=CANDIDATES, log=None, cache_dir=str(tmp_path))  # fmt: skip
    assert again["cached"] and again["chosen"] == r["chosen"] and again["seconds"] < r["seconds"]


_CACHE_CHECK = """
import importlib.util, json, os, sys
import jax
spec = importlib.util.spec_from_file_location("cache", sys.argv[2])  # alone: a quick start
cache = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cache)
enable_compilation_cache = cache.enable_compilation_cache
def state():
    return [jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size,
            jax.config.jax_persistent_cache_min_compile_time_secs]
os.environ["CROSSBOW_JAX_CACHE"] = sys.argv[1]
out = {"default": [enable_compilation_cache(), *state()]}
jax.jit(lambda x: x * 3 + 1).lower(1.0).compile()
out["written"] = sorted(os.listdir(os.path.join(sys.argv[1], "xla")))
jax.config.update("jax_compilation_cache_dir", None)
os.environ["CROSSBOW_JAX_CACHE"] = ""
out["off"] = [enable_compilation_cache(), jax.config.jax_compilation_cache_dir]
jax.config.update("jax_compilation_cache_dir", "/the/users/own")
os.environ["CROSSBOW_JAX_CACHE"] = sys.argv[1]
out["user"] = [enable_compilation_cache(), jax.config.jax_compilation_cache_dir]
print(json.dumps(out))
"""


def test_the_compilation_cache_is_on_by_default_off_with_an_empty_folder(tmp_path):
    """JAX's persistent compilation cache goes to the cache folder's `xla` (every program
    written), an empty CROSSBOW_JAX_CACHE turns it off, and a folder the user gave JAX
    stands. In a process of its own: the suite's process keeps its own cache."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}  # fmt: skip
    folder = str(tmp_path / "cache")
    from crossbow_jax.engine import cache

    done = subprocess.run([sys.executable, "-c", _CACHE_CHECK, folder, cache.__file__], env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    xla = os.path.join(folder, "xla")
    assert out["default"] == [xla, xla, 4 << 30, 0.0]
    assert any(name.endswith("-cache") for name in out["written"])  # the program, on disk
    assert out["off"] == [None, None]
    assert out["user"] == ["/the/users/own", "/the/users/own"]


ONLINE = TrainConfig(batch_size=8, learners_per_device=2, num_devices=1, tune_steps=2,
                     tune_repeats=1, progress=False, epochs=2, eval_every=4)  # fmt: skip


@pytest.fixture(scope="module")
def online():
    from crossbow_jax.engine.checks import check_run
    from crossbow_jax.engine.inputs import resolve

    model, data, mesh = resolve(ONLINE, MLP(), *split(n_train=128, n_test=32))
    return model, data, mesh, check_run(ONLINE, model, None, data)


class Slowed(OnlineExecutions):
    """The chooser, seeing one candidate's dispatches as 1000x slower than they ran (a
    fake-slow candidate, without sleeping). Each candidate is judged on one dispatch of a
    tiny MLP (about a millisecond): at 10x, a stall of the other worker's load on a 2-core
    machine made the real candidate look slower once in a fresh clone's suite."""

    def __init__(self, *args, slow: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.slow = slow

    def observe(self, execution, samples, compile_seconds, remaining, cold):
        if execution == self.slow:
            samples = [(images, 1000 * seconds, steps) for images, seconds, steps in samples]
        return super().observe(execution, samples, compile_seconds, remaining, cold)


def test_the_online_choice_trains_every_step_and_keeps_the_fastest(online, tmp_path):
    from crossbow_jax.engine import fit

    model, data, mesh, task = online
    fast = "vmap"
    chooser = Slowed(ONLINE, model, data, mesh, slow="unroll", candidates=["unroll", "vmap"],
                     repay=0.0, cache_dir=str(tmp_path), log=None)  # fmt: skip
    r = fit(ONLINE, model, None, data, mesh, 2, task=task, chooser=chooser)
    pinned = fit(ONLINE.replace(execution=fast), model, None, data, mesh, 2, task=task)
    # 8 steps an epoch; unroll (the CPU's default) runs steps 1-4, vmap 5-8, the faster the rest
    assert r.steps == pinned.steps == 16 and r.history[-1]["epoch"] == pinned.history[-1]["epoch"]
    assert [h["step"] for h in r.history] == [h["step"] for h in pinned.history]
    assert [(c["execution"], c["steps"], c["status"]) for c in r.executions["candidates"]] == [
        ("unroll", 4, "ok"), ("vmap", 4, "ok")]  # fmt: skip
    assert r.executions["chosen"] == r.config.execution == fast and not r.executions["deciding"]
    assert r.executions["seconds"] > 0 and r.programs[0] > pinned.programs[0]
    for got, want in zip(jax.tree.leaves(r.params), jax.tree.leaves(pinned.params)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # the same steps
    assert r.accuracy == pytest.approx(pinned.accuracy, abs=1e-6)
    stored = json.loads(Path(r.executions["cache_file"]).read_text())
    assert stored["chosen"] == fast and os.path.dirname(r.executions["cache_file"]) == str(tmp_path)
    again = OnlineExecutions(ONLINE, model, data, mesh, candidates=["unroll", "vmap"],
                             cache_dir=str(tmp_path), log=None)  # fmt: skip
    assert again.start(2) == fast and not again.deciding and again.report()["cached"]


@pytest.mark.measure_execution  # the default rule (REPAY), not the suite's
def test_another_candidate_is_tried_only_when_the_run_can_repay_it(online, tmp_path):
    model, data, mesh, _ = online
    samples = [(16, 0.01, 1)] * 4  # 1,600 images/s, 16 images a step: 10 ms a step
    for remaining, following in ((999, "unroll"), (1001, "vmap")):  # 9.99 s, 10.01 s left
        chooser = OnlineExecutions(ONLINE, model, data, mesh, candidates=["vmap", "unroll"],
                                   cache_dir="", log=None)  # fmt: skip
        assert chooser.start(2) == "unroll" and chooser.deciding  # the CPU's default first
        assert chooser.observe("unroll", samples, 1.0, remaining) == following  # 10 x 1 s
        report = chooser.report()
        assert chooser.deciding == (following == "vmap") and report["seconds"] == 0.0
    assert report["skipped"] is None
    # A warm run (its programs loaded from the compilation cache in 0.05 s) weighs the cold
    # compilation an earlier run measured (1 s), not its own.
    for compiled, cold in ((1.0, True), (0.05, False)):
        skip = OnlineExecutions(ONLINE, model, data, mesh, candidates=["vmap", "unroll"],
                                cache_dir=str(tmp_path), log=None)  # fmt: skip
        skip.start(2)
        assert skip.observe("unroll", samples, compiled, 999, cold=cold) == "unroll"
        assert "not measured: vmap" in skip.report()["skipped"] and not skip.deciding
    assert json.loads(next(tmp_path.glob("compile-*.json")).read_text())["compile_seconds"] == {
        "unroll": 1.0}  # fmt: skip
    assert not list(tmp_path.glob("execution-*.json"))  # no decision: vmap was not measured


@pytest.mark.measure_execution
def test_a_short_run_measures_nothing_beyond_its_own_steps(tmp_path, monkeypatch):
    import crossbow_jax

    monkeypatch.setenv("CROSSBOW_JAX_CACHE", str(tmp_path))
    train, test = split(n_train=384, n_test=32)
    r = crossbow_jax.train(MLP(), train, test, batch_size=8, learners_per_device=2,
                           num_devices=1, epochs=1, tune_steps=2, tune_repeats=1,
                           progress=False)  # fmt: skip  # 24 steps
    e = r.executions
    assert r.steps == 24 and e["mode"] == "online" and r.config.execution == "unroll"
    assert [c["execution"] for c in e["candidates"]] == ["unroll"] and e["seconds"] == 0.0
    assert "vmap" in e["skipped"] and "im2col" in e["skipped"] and e["cache_file"] is None
    assert not list(tmp_path.glob("execution-*.json"))  # a partial choice is not cached


def test_the_online_choice_reads_a_decision_of_tunes_trials(run, tmp_path):
    model, data, mesh = run
    choose(run, Fake({"vmap": 300.0, "unroll": 200.0}), tmp_path)  # `tune`'s trials, cached
    chooser = OnlineExecutions(CFG, model, data, mesh, candidates=CANDIDATES,
                               cache_dir=str(tmp_path), log=None)  # fmt: skip
    assert chooser.start(2) == "vmap" and not chooser.deciding and chooser.report()["cached"]
