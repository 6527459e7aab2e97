"""The paper's sweeps (experiments/ on the runner crossbow_jax.sweeps): every quick variant
runs for real and writes its rows, plot and table; a second run skips the rows already there
(resume)."""

import json

import pytest

from crossbow_jax import sweeps
from crossbow_jax.cli import main as cli_main
from crossbow_jax.sweeps import report
from experiments import EXPERIMENTS, _sweep, get_config

ROW_FIELDS = {
    "experiment",
    "key",
    "labels",
    "settings",
    "seed",
    "device",
    "versions",
    "date",
    "figures",
}


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("sweeps")


COMPILE_BOUND = {"statistical_efficiency_resnet32"}
"""Sweeps whose quick run is checked, not run: compiling ResNet-32 alone takes 20-40 s on a
CPU, its training is test_models_train's, and the runner is the other sweeps'."""


@pytest.mark.parametrize("name", sorted(COMPILE_BOUND))
def test_compile_bound_quick_sweeps_are_valid_configs(name):
    config = sweeps.check_config(get_config(name, quick=True))
    assert sweeps.expand(config) and config["name"] == name


@pytest.mark.parametrize(  # statistical_efficiency runs before time_to_accuracy
    "name", [n for n in EXPERIMENTS if n not in COMPILE_BOUND]
)
def test_quick_sweep_writes_rows_plot_table_and_resumes(name, out):
    config = get_config(name, quick=True)
    rows = sweeps.sweep(config, out, log=quiet)
    assert sorted(r["key"] for r in rows) == sorted(r["key"] for r in sweeps.expand(config))
    path = out / f"{name}.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == len(rows) >= 2
    for row in map(json.loads, lines):
        assert ROW_FIELDS <= set(row), sorted(ROW_FIELDS - set(row))
        assert row["versions"]["jax"] and row["versions"]["crossbow_jax"]
        assert row["device"]["platform"] == "cpu" and row["device"]["cpu_cores_usable"] >= 1
        assert row["figures"]["images_per_second"] > 0
        if config["measure"] == "train":
            assert 0 <= row["figures"]["final_accuracy"] <= 1 and row["figures"]["curve"]
    if name == "time_to_accuracy" and (out / "statistical_efficiency.jsonl").exists():
        assert all(r.get("reused_from") == "statistical_efficiency" for r in rows)
    assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "| n |" in (out / f"{name}.md").read_text()
    for spec in config.get("ratios", ()):
        assert spec["title"] in (out / f"{name}.md").read_text()

    again = sweeps.sweep(config, out, log=quiet)  # nothing left to run
    assert path.read_text().splitlines() == lines and len(again) == len(rows)


def _fake_config():
    return {
        "name": "fake",
        "measure": "train",
        "seeds": 2,
        "fixed": {"model": "lenet", "dataset": "synthetic", "batch_size": 8},
        "grid": [{"variant": "a", "learning_rate": 0.1}, {"variant": "b", "seeds": 1}],
        "table": {"group": ["variant"], "figures": ["final_accuracy", "epochs_to_target"]},
        "plots": [{"x": "learning_rate", "y": "final_accuracy", "series": "variant"}],
    }


@pytest.fixture
def fake_training(monkeypatch):
    """Replaces training by a stub that records which runs it was given."""
    calls = []

    def measure(run, data, show=None):
        calls.append((run["labels"].get("variant"), run["seed"]))
        return {
            "final_accuracy": 0.5 + run["seed"] / 10,
            "epochs_to_target": None,
            "images_per_second": 1.0,
            "curve": [[1.0, 0.5]],
        }

    monkeypatch.setitem(sweeps.MEASURES, "train", measure)
    return calls


def test_expand_runs_seed_by_seed_with_per_point_seed_caps():
    runs = sweeps.expand(_fake_config())
    assert [(r["labels"]["variant"], r["seed"]) for r in runs] == [("a", 0), ("b", 0), ("a", 1)]
    assert runs[0]["settings"]["learning_rate"] == 0.1 and "variant" not in runs[0]["settings"]
    assert len({r["key"] for r in runs}) == 3
    assert [r["key"] for r in sweeps.expand(_fake_config())] == [r["key"] for r in runs]


def test_half_done_sweep_resumes_with_the_missing_runs_only(tmp_path, fake_training):
    config = _fake_config()
    sweeps.sweep(config, tmp_path, seeds=1, log=quiet)
    assert fake_training == [("a", 0), ("b", 0)]
    with (tmp_path / "fake.jsonl").open("a") as f:
        f.write('{"torn": ')  # a run killed while writing its row
    rows = sweeps.sweep(config, tmp_path, log=quiet)
    assert fake_training == [("a", 0), ("b", 0), ("a", 1)] and len(rows) == 3
    table = (tmp_path / "fake.md").read_text()
    assert "| a | 2 | 0.5500 ± 0.0707 | not reached (0/2) |" in table


def test_shards_split_a_sweep_between_processes(tmp_path, fake_training):
    config = _fake_config()  # runs: (a, 0), (b, 0), (a, 1)
    sweeps.sweep(config, tmp_path, shard=(1, 2), log=quiet)
    assert fake_training == [("b", 0)]
    rows = sweeps.sweep(config, tmp_path, shard=(0, 2), log=quiet)
    assert fake_training == [("b", 0), ("a", 0), ("a", 1)] and len(rows) == 3
    with pytest.raises(SystemExit):
        _sweep.main("sensitivity", ["--quick", "--shard", "2/2"])


def test_summaries_count_diverged_and_unreached_runs():
    rows = [
        {"figures": {"status": "diverged"}},
        {"figures": {"epochs_to_target": 2.0}},
        {"figures": {"epochs_to_target": None}},
    ]
    assert report.summarise(rows, "epochs_to_target") == "2.00 (1/3), 1 diverged"
    assert report.summarise(rows[:1], "final_accuracy") == "diverged (1/1)"


def test_table_sorts_groups_numbers_by_value_then_text():
    config = {"table": {"group": ["k", "variant"], "figures": ["final_accuracy"]}}
    rows = [
        {"labels": {"k": k, "variant": v}, "figures": {"final_accuracy": 0.5}}
        for k, v in [(16, "sma"), (4, "ssgd"), (4, "sma"), (None, "sma")]
    ]
    lines = report.table(config, rows).splitlines()[2:]
    assert [line.split(" | ")[:2] for line in lines] == [
        ["| 4", "sma"],
        ["| 4", "ssgd"],
        ["| 16", "sma"],
        ["| None", "sma"],
    ]


def test_ratio_matrix_divides_the_means_of_two_groups_cell_by_cell():
    def row(alg, b, m, ips, model="lenet"):
        return {
            "labels": {"line": alg},
            "settings": {
                "algorithm": alg,
                "batch_size": b,
                "learners_per_device": m,
                "model": model,
            },
            "figures": {"images_per_second": ips},
        }

    rows = [row("sma", 8, 1, 90.0), row("sma", 8, 1, 110.0), row("ssgd", 8, 1, 200.0)]
    rows += [row("sma", 8, 4, 300.0), row("ssgd", 8, 4, 100.0), row("sma", 16, 1, 50.0)]
    rows += [row("ssgd", 8, 1, 1.0, model="other")]
    spec = {
        "figure": "images_per_second",
        "split": "algorithm",
        "over": ("sma", "ssgd"),
        "rows": "batch_size",
        "cols": "learners_per_device",
        "where": {"model": "lenet"},
        "title": "ratio",
    }
    lines = report.ratio_matrix(spec, rows).splitlines()
    assert lines[0] == "ratio" and lines[2] == "| batch_size \\ learners_per_device | 1 | 4 |"
    assert lines[4:] == ["| 8 | 0.50 | 3.00 |", "| 16 |  |  |"]  # no ssgd row at b = 16


def test_both_front_doors_run_a_sweep(tmp_path, fake_training, capsys):
    assert cli_main(["sweep", "sensitivity", "--quick", "--out", str(tmp_path / "cli")]) == 0
    assert len((tmp_path / "cli" / "sensitivity.jsonl").read_text().splitlines()) == 2
    assert _sweep.main("sensitivity", ["--quick", "--out", str(tmp_path / "cli")]) == 0
    assert len(fake_training) == 2  # the second front door found both rows done
    assert cli_main(["sweep", "--list"]) == 0
    assert "statistical_efficiency" in capsys.readouterr().out
    assert cli_main(["sweep", "no_such_experiment"]) == 2


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_committed_results_hold_a_row_for_every_run_of_the_first_seed(name):
    """A config change that renames its runs (their keys hash the settings) would orphan
    the rows docs/results.md quotes: a rerun would redo them and the tables drop them."""
    path = _sweep.RESULTS / f"{name}.jsonl"
    assert path.exists(), f"no committed results for {name}"
    keys = {row["key"] for row in sweeps.read_rows(path)}
    missing = [
        r["labels"] for r in sweeps.expand(get_config(name), seeds=1) if r["key"] not in keys
    ]
    assert not missing, f"{name}: no committed row for {missing}"
