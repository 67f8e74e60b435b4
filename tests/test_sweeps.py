"""Sweeps: an Optuna search and a submitit multirun run end to end; sweep configs compose; the report ranks runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from attnlab import sweeps
from attnlab.attention import ConfigError
from attnlab.report import find_runs, report, swept_keys

ROOT = Path(__file__).resolve().parents[1]
SEARCHES = sorted(p.stem for p in (ROOT / "conf/hparams_search").glob("*.yaml"))
# The smallest job that validates: 2 steps, one validation, no test pass (its own ~second per job).
TINY = ["logger=csv", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
        "test=false", "model.net.d_model=16", "model.net.n_heads=2", "model.net.d_ff=32", "model.net.n_layers=1",
        "task.max_len=6", "task.batch_size=4", "task.val_size=8"]


def _train_py(*args, timeout=300):
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _compose(overrides):
    """The full config, hydra node included, as `python train.py -m <overrides>` composes it."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_optuna_sweep_of_three_trials(tmp_path):
    res = _train_py("-m", "hparams_search=copy_optuna", "hydra.sweeper.n_trials=3", "attention=memsizer", *TINY,
                    f"hydra.sweep.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Directions: ['maximize']" in res.stdout + res.stderr  # copy's monitor.mode is max
    found = sorted(tmp_path.glob("*/results.json"))
    assert len(found) == 3, found
    results = [json.loads(p.read_text()) for p in found]
    assert {r["config"]["optimized_metric"] for r in results} == {"val/acc"}
    values = [r["metrics"]["val/acc"] for r in results]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(values)  # the returned number is val/acc, maximised
    # Job dirs are named by number and overrides; each trial ran the values Optuna drew, MemSizer's slots included.
    for path, r in zip(found, results):
        name = path.parent.name
        num, _, rest = name.partition("_")
        assert num.isdigit() and rest.split(",") == [  # what Optuna drew; the fixed command-line overrides stay out
            f"{k}={sweeps._short(str(v))}" for k, v in sorted({
                "attention.decoder.k": r["config"]["attention"]["decoder"]["k"],
                "model.net.dropout": r["config"]["model"]["net"]["dropout"],
                "model.optimizer.lr": r["config"]["model"]["optimizer"]["lr"]}.items())]
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((path.parent / ".hydra/overrides.yaml").read_text()))
        assert float(overrides["model.optimizer.lr"]) == r["config"]["model"]["optimizer"]["lr"]
        assert int(overrides["attention.decoder.k"]) == r["config"]["attention"]["decoder"]["k"]
        assert 2 <= r["config"]["attention"]["decoder"]["k"] <= 32
    lrs = [r["config"]["model"]["optimizer"]["lr"] for r in results]
    assert len(set(lrs)) == 3 and all(3e-4 <= lr <= 3e-2 for lr in lrs)
    winner = next(r for r in results if r["metrics"]["val/acc"] == best["best_value"])
    assert best["best_params"]["model.optimizer.lr"] in lrs
    # The report on the sweep ranks Optuna's best first and sees what was searched.
    out = report(tmp_path, use_wandb=False)
    assert out["metric"] == "val/acc" and out["mode"] == "max"
    assert {"model.optimizer.lr", "model.net.dropout", "attention.decoder.k"} <= set(out["swept"])
    top = json.loads((tmp_path / out["order"][0] / "results.json").read_text())
    assert top["metrics"]["val/acc"] == winner["metrics"]["val/acc"]


def test_submitit_local_multirun(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")  # the `cluster` extra; `dev` installs it
    res = _train_py("-m", "launcher=local", "attention=softmax,linear", *TINY, f"hydra.sweep.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    found = sorted(tmp_path.glob("*/results.json"))
    assert len(found) == 2
    assert sorted(json.loads(p.read_text())["config"]["attention"]["name"] for p in found) == ["linear", "softmax"]
    assert [p.parent.name.split(",")[0] for p in found] == ["0_attention=softmax", "1_attention=linear"]
    # submitit ran them: one job folder each, with the pickled result the sweeping process collected
    assert len(list((tmp_path / ".submitit").glob("*/*_result.pkl"))) == 2


@pytest.mark.parametrize("search", SEARCHES)
def test_every_search_composes_and_follows_the_task_direction(search):
    task = search.removesuffix("_optuna")
    cfg = _compose([f"hparams_search={search}", f"task={task}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.params
    assert sweeper.direction == {"min": "minimize", "max": "maximize"}[cfg.monitor.mode]
    flipped = "min" if cfg.monitor.mode == "max" else "max"
    cfg = _compose([f"hparams_search={search}", f"task={task}", f"monitor.mode={flipped}"])
    assert cfg.hydra.sweeper.direction == {"min": "minimize", "max": "maximize"}[flipped]
    # every searched key exists in the composed config (a typo would only fail on the first trial)
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", key
    for variant, options in (cfg.get("attention_search") or {}).items():
        var_cfg = _compose([f"hparams_search={search}", f"task={task}", f"attention={variant}"])
        for option in options:
            assert OmegaConf.select(var_cfg, f"attention.{option}", default="<missing>") != "<missing>", option


def test_search_space_adds_the_running_variants_options(tmp_path):
    import optuna

    def drawn(*overrides):
        cfg = _compose(["hparams_search=wmt_optuna", "task=wmt", f"hydra.sweep.dir={tmp_path}", *overrides])
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
        for key, value in dict(o.split("=", 1) for o in overrides if o.startswith("attention.")).items():
            trial.set_user_attr(key, value)  # what the plugin does with a fixed command-line override
        sweeps.search_space(cfg, trial)
        return trial.params

    params = drawn("attention=memsizer")
    assert set(params) == {"attention.k", "attention.decoder.k"}
    assert 8 <= params["attention.k"] <= 64 and 2 <= params["attention.decoder.k"] <= 16
    assert set(drawn("attention=memsizer", "attention.k=32")) == {"attention.decoder.k"}  # fixed wins
    assert drawn("attention=linear") == {}  # nothing to search
    recorded = yaml.safe_load((tmp_path / "multirun.yaml").read_text())  # the sweep's record, for job names
    assert "attention=memsizer" in recorded["hydra"]["overrides"]["task"]


def test_direction_resolver_rejects_an_unknown_mode():
    assert sweeps.direction("min") == "minimize" and sweeps.direction("max") == "maximize"
    with pytest.raises(ConfigError, match="monitor.mode"):
        sweeps.direction("minimum")


def test_slurm_launcher_preset_composes():
    cfg = _compose(["launcher=slurm", "hydra.launcher.tasks_per_node=4", "hydra.launcher.nodes=2"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 4 and cfg.hydra.launcher.timeout_min > 0
    assert cfg.trainer.devices == 4 and cfg.trainer.num_nodes == 2 and cfg.trainer.accelerator == "gpu"


def _job_name(num, overrides, sweep_dir, exclude=("logger",)):
    root = OmegaConf.create({"hydra": {"overrides": {"task": list(overrides)}, "sweep": {"dir": str(sweep_dir)},
                                       "job": {"config": {"override_dirname": {"exclude_keys": list(exclude)}}}}})
    return sweeps.subdir(num, _root_=root)


def test_sweep_dir_names_are_safe_unique_and_bounded(tmp_path):
    job = ["model.optimizer.lr=0.0012345678901234", "attention=softmax", "logger=csv", "trainer.max_steps=2"]
    # no multirun.yaml: every override but the excluded ones, sorted; floats cut to 4 digits in the name only
    assert _job_name(3, job, tmp_path) == "3_attention=softmax,model.optimizer.lr=0.001235,trainer.max_steps=2"
    # with it: what the sweep's command line fixed for all jobs is left out
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"overrides": {"task": ["attention=softmax,linear", "trainer.max_steps=2", "logger=csv"]}}}))
    assert _job_name(3, job, tmp_path) == "3_attention=softmax,model.optimizer.lr=0.001235"
    assert _job_name(0, ["trainer.max_steps=2"], tmp_path) == "0_trainer.max_steps=2"  # nothing varies: all
    assert _job_name(0, [], tmp_path) == "0_defaults"
    assert _job_name(1, ["model/optimizer=adamw", "run_name=a b"], tmp_path) == "1_model.optimizer=adamw,run_name=a_b"
    a = _job_name(7, ["x=" + "a" * 300 + "1"], tmp_path)
    b = _job_name(7, ["x=" + "a" * 300 + "2"], tmp_path)
    assert a != b and len(a.encode()) <= 130 and len(b.encode()) <= 130


def _write_run(root, name, metrics, lr, attention, overrides=True, steps=100):
    run = root / name
    cfg = {"seed": 1, "optimized_metric": "val/loss", "monitor": {"metric": "val/loss", "mode": "min"},
           "attention": {"name": attention, "k": 8}, "model": {"optimizer": {"lr": lr}},
           "paths": {"output_dir": str(run)}, "trainer": {"default_root_dir": str(run)},
           "callbacks": {"model_checkpoint": {"dirpath": f"{run}/checkpoints"}}}
    (run / ".hydra").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"metrics": metrics, "steps": steps, "wall_time_s": 12.5,
                                                  "parameters": 12345, "config": cfg}))
    if overrides:
        (run / ".hydra/overrides.yaml").write_text(yaml.safe_dump([f"attention={attention}",
                                                                   f"model.optimizer.lr={lr}"]))


def test_report_ranks_runs_and_draws_the_plot(tmp_path, monkeypatch):
    root = tmp_path / "sweep"
    _write_run(root, "0_a", {"val/loss": 2.0, "val/acc": 0.50}, 1e-3, "linear")
    _write_run(root, "1_b", {"val/loss": 1.5, "val/acc": 0.40}, 1e-2, "softmax")
    _write_run(root, "2_c", {"val/loss": float("nan"), "val/acc": 0.90}, 1e-1, "softmax")
    _write_run(root, "10_d", {"val/loss": 1.8, "val/acc": 0.70}, 1e-4, "linear", overrides=False)
    runs = find_runs(root)
    assert [r.name for r in runs] == ["0_a", "1_b", "2_c", "10_d"]  # job numbers sort as numbers
    assert swept_keys(runs) == ["attention", "model.optimizer.lr"]  # not the per-run paths, nor attention.name twice

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = report(root, out=tmp_path / "out")  # val/loss from the configs' optimized_metric, min from monitor.mode
    assert (out["metric"], out["mode"]) == ("val/loss", "min")
    assert out["order"] == ["1_b", "10_d", "0_a", "2_c"]  # NaN last
    md = (tmp_path / "out/report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")][1:]
    assert [row.split("|")[2].strip(" `") for row in rows] == out["order"]
    assert rows[0].split("|")[1].strip() == "**best**" and "**best**" not in "".join(rows[1:])
    assert "| softmax | 0.01 | 1.5 |" in rows[0] and "12,345" in rows[0]
    png = (tmp_path / "out/report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    wandb_runs = list((tmp_path / "out/wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1
    # what the wandb client wrote itself (the .wandb log is flushed by the service, maybe after finish() returns)
    logged = list((wandb_runs[0] / "files/media/table/report").glob("table_*.table.json"))
    assert len(logged) == 1 and json.loads(logged[0].read_text())["data"][0][0] == "1_b"
    assert list((wandb_runs[0] / "files/media/images/report").glob("plot_*.png"))

    out = report(root, metric="val/acc", use_wandb=False)  # higher is better for accuracy
    assert out["mode"] == "max" and out["order"] == ["2_c", "10_d", "0_a", "1_b"]
    assert (root / "report.md").exists() and not list(root.glob(".report.*"))  # no temp files left behind
    with pytest.raises(SystemExit, match="val/bleu"):
        report(root, metric="val/bleu", use_wandb=False)


def test_report_cli(tmp_path):
    _write_run(tmp_path, "0_a", {"val/loss": 2.0}, 1e-3, "linear")
    _write_run(tmp_path, "1_b", {"val/loss": 1.0}, 1e-2, "linear")
    res = subprocess.run([sys.executable, "-m", "attnlab.report", str(tmp_path), "--no-wandb", "--mode", "max"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "best: 0_a" in res.stdout and (tmp_path / "report.png").exists()
