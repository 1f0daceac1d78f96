"""The experiment runner and report: a two-arm two-seed experiment end to end through the real entry points,
skipped on rerun, refused when its recipe changed; intervals and paired differences against a hand computation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, subprocess_env

from experiments.runner import check_stages
from experiments.spec import arms, control_of, load_spec
from experiments.stats import paired, summarize, t_quantile_975
from launch.config import ConfigError

SMOKE = "experiments/recipes/smoke.yaml"


def _experiments(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments", *args],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_t_interval_matches_hand_computation():
    s = summarize([250.0, 262.0, 271.0])
    mean = 261.0
    sd = math.sqrt(((250 - mean) ** 2 + (262 - mean) ** 2 + (271 - mean) ** 2) / 2)
    assert s.n == 3 and s.mean == pytest.approx(mean) and s.sd == pytest.approx(sd)
    assert s.half == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-4)  # t_{0.975, 2}
    assert t_quantile_975(1) == pytest.approx(12.7062) and t_quantile_975(30) == pytest.approx(2.0423)
    assert t_quantile_975(60) == pytest.approx(2.0003, abs=2e-4)
    assert t_quantile_975(1000) == pytest.approx(1.9623, abs=2e-4)
    assert summarize([5.0]).n == 1 and math.isnan(summarize([5.0]).half)
    diffs, d = paired({0: 10.0, 1: 12.0, 2: 9.0}, {0: 11.0, 1: 8.0, 3: 1.0})  # seed 2 and 3 unpaired: left out
    assert diffs == {0: -1.0, 1: 4.0} and d.n == 2 and d.mean == pytest.approx(1.5)
    assert d.half == pytest.approx(12.7062 * math.sqrt(12.5) / math.sqrt(2), rel=1e-4)


def test_spec_arms_pairing_and_errors(tmp_path):
    spec = load_spec(REPO / SMOKE)
    names = [a.name for a in arms(spec)]
    assert names == ["mixgen-off", "mixgen-on"]
    on = arms(spec)[1]
    assert control_of(spec, on).name == "mixgen-off" and control_of(spec, arms(spec)[0]) is None
    with pytest.raises(ConfigError, match="factors\\[0\\].control"):
        load_spec(REPO / SMOKE, ["factors=[{name: m, control: x, levels: [{name: a}]}]"])
    with pytest.raises(ConfigError, match="metrics\\[0\\]"):
        load_spec(REPO / SMOKE, ["metrics=[finetuned.rsum]"])
    with pytest.raises(ConfigError, match="unknown config key 'seed'"):
        load_spec(REPO / SMOKE, ["seed=1"])
    with pytest.raises(ConfigError, match="factors\\[0\\].log_x: every level needs an x > 0"):
        load_spec(REPO / SMOKE, ["factors=[{name: f, log_x: true, levels: [{name: a, x: 1}, {name: b}]}]"])


def test_missing_requirement_stops_before_any_work(tmp_path):
    out = tmp_path / "runs"
    res = _experiments(
        "run", SMOKE, f"out={out}", f"results={tmp_path / 'res'}",
        f"requires=[{{path: {tmp_path}/style_checkpoint.safetensors, what: a trained style network, "
        "make: 'torchrun -m pretrain --config configs/pretrain/style_tiny.yaml'}]",
        timeout=60,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "needs a trained style network" in res.stderr and "nothing was started" in res.stderr
    assert "configs/pretrain/style_tiny.yaml" in res.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "recipe", sorted(str(p.relative_to(REPO)) for p in (REPO / "experiments/recipes").rglob("*.yaml"))
)
def test_every_shipped_recipe_starts(recipe):
    # every stage of every arm validates against its entry's schema: a recipe that would fail hours in is caught
    check_stages(load_spec(REPO / recipe))


def test_a_stage_that_would_fail_stops_the_run_before_any_work(tmp_path):
    # a bad key in one arm's evaluation overrides, and a bad value in the other's pretraining: both are named
    factors = ("factors=[{name: mixgen, control: 'off', levels: [{name: 'off', pretrain: [mixgen.enabled=false], "
               "evals: {zeroshot: [eval.no_such_key=1]}}, {name: 'on', pretrain: [mixgen.enabled=true, "
               "mixgen.ratio=2.0]}]}]")  # fmt: skip
    with pytest.raises(ConfigError) as err:
        check_stages(load_spec(REPO / SMOKE, [factors]))
    assert "mixgen=off, zeroshot" in str(err.value) and "no_such_key" in str(err.value)
    assert "mixgen=on, pretrain" in str(err.value) and "mixgen.ratio" in str(err.value)
    out = tmp_path / "runs"
    res = _experiments("run", SMOKE, f"out={out}", f"results={tmp_path / 'res'}", factors, timeout=120)
    assert res.returncode == 2 and "stages that would fail" in res.stderr, res.stderr
    assert not out.exists()  # not even the data set was built


@pytest.mark.slow
def test_two_arm_two_seed_experiment_end_to_end(tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results"
    common = [f"out={out}", f"results={results}"]
    res = _experiments("run", SMOKE, *common)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    spec = load_spec(REPO / SMOKE, common)
    # every (arm, seed) has its own folders, from the real entry points
    per_run = {}
    for arm in arms(spec):
        for seed in (0, 1):
            root = out / "smoke" / arm.name / f"seed{seed}"
            summary = json.loads((root / "pretrain" / "summary.json").read_text())
            assert summary["steps"] == 3
            cfg = (root / "pretrain" / "config.yaml").read_text()
            assert f"enabled: {'true' if arm.name.endswith('on') else 'false'}" in cfg
            test = json.loads((root / "zeroshot" / "results.json").read_text())["splits"]["test"]
            per_run[(arm.name, seed)] = test["rsum"]
            assert json.loads((root / "metrics.json").read_text())["metrics"]["zeroshot.rsum"] == test["rsum"]
    # the two seeds trained differently (run.seed reaches the engine)
    assert (
        per_run[("mixgen-off", 0)] != per_run[("mixgen-off", 1)]
        or per_run[("mixgen-on", 0)] != per_run[("mixgen-on", 1)]
    )
    # the report: numbers recomputed here from the runs' own results.json
    report = json.loads((results / "smoke" / "results.json").read_text())
    on = report["metrics"]["zeroshot.rsum"]["mixgen-on"]
    vals = [per_run[("mixgen-on", s)] for s in (0, 1)]
    assert on["n"] == 2 and on["mean"] == pytest.approx(sum(vals) / 2)
    assert on["ci95_half"] == pytest.approx(12.7062 * abs(vals[0] - vals[1]) / math.sqrt(2) / math.sqrt(2), rel=1e-4)
    diffs = [per_run[("mixgen-on", s)] - per_run[("mixgen-off", s)] for s in (0, 1)]
    assert on["vs_control"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert on["vs_control"]["diffs"] == {"0": pytest.approx(diffs[0]), "1": pytest.approx(diffs[1])}
    md = (results / "smoke" / "README.md").read_text()
    assert "paired difference vs mixgen=off" in md and "| mixgen=on | 2 |" in md
    for png in ("zeroshot.rsum.png", "zeroshot.rsum_diff.png", "zeroshot.txt_r1.png"):
        assert (results / "smoke" / png).stat().st_size > 1000

    # a rerun skips every finished stage (no training, no evaluation)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("stage.json")}
    assert len(stamps) == 1 + 4 * 2  # one data set, 4 runs x (pretrain, zeroshot)
    res = _experiments("run", SMOKE, *common, "--no-report", timeout=60)
    assert res.returncode == 0, res.stderr
    assert "$ " not in res.stdout and {p: p.stat().st_mtime_ns for p in out.rglob("stage.json")} == stamps

    # keep_checkpoints=false on a rerun frees the finished runs' checkpoints, keeps their exports and results
    assert len(list(out.rglob("checkpoints"))) == 4
    res = _experiments("run", SMOKE, *common, "keep_checkpoints=false", "--no-report", timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("dropped ") == 4 and "$ " not in res.stdout
    assert not list(out.rglob("checkpoints")) and len(list(out.rglob("pretrain/export.safetensors"))) == 4
    assert {p: p.stat().st_mtime_ns for p in out.rglob("stage.json")} == stamps

    # a changed recipe is refused, naming the folder, instead of mixing two settings under one name
    res = _experiments("run", SMOKE, *common, "pretrain.overrides=[train.max_steps=5]", timeout=60)
    assert res.returncode == 2 and "finished with another command" in res.stderr
    assert str(out / "smoke" / "mixgen-off" / "seed0" / "pretrain") in res.stderr


def test_report_lists_missing_runs(tmp_path):
    spec = load_spec(REPO / SMOKE, [f"out={tmp_path / 'runs'}", f"results={tmp_path / 'res'}"])
    from experiments import report

    root = Path(spec.out) / "smoke" / "mixgen-off" / "seed0" / "zeroshot"
    root.mkdir(parents=True)
    (root / "results.json").write_text(json.dumps({"splits": {"test": {"rsum": 100.0, "txt_r1": 5.0}}}))
    out = report.write(spec)
    data = json.loads((out / "results.json").read_text())
    assert data["metrics"]["zeroshot.rsum"]["mixgen-off"]["n"] == 1
    assert data["metrics"]["zeroshot.rsum"]["mixgen-on"]["n"] == 0
    assert len(data["missing"]) == 3 and "(n=1, no interval)" in (out / "README.md").read_text()


def _earlier(spec, values: dict, fingerprints: dict) -> dict:
    """A results.json as an earlier report wrote it: values[(arm, seed)] = (rsum, txt_r1)."""
    metrics: dict = {"zeroshot.rsum": {}, "zeroshot.txt_r1": {}}
    for (arm, seed), (rsum, r1) in values.items():
        for m, v in (("zeroshot.rsum", rsum), ("zeroshot.txt_r1", r1)):
            metrics[m].setdefault(arm, {"values": {}})["values"][str(seed)] = v
    return {"name": "smoke", "seeds": [0, 1], "generated": "2026-12-01T10:00:00Z", "commit": "abc1234",
            "arms": [{"name": a.name, "levels": {f: lv.name for f, lv in a.levels}} for a in arms(spec)],
            "metrics": metrics, "fingerprints": fingerprints}  # fmt: skip


def test_report_carries_runs_whose_folders_are_gone(tmp_path):
    from experiments import report
    from experiments.__main__ import main
    from experiments.runner import arm_fingerprint

    common = [f"out={tmp_path / 'runs'}", f"results={tmp_path / 'res'}"]
    spec = load_spec(REPO / SMOKE, common)
    off, on = arms(spec)
    # one run is still on disk; the earlier report has it too, with another value: the folder wins
    root = Path(spec.out) / "smoke" / "mixgen-off" / "seed0" / "zeroshot"
    root.mkdir(parents=True)
    (root / "results.json").write_text(json.dumps({"splits": {"test": {"rsum": 100.0, "txt_r1": 5.0}}}))
    old = {("mixgen-off", 0): (1.0, 1.0), ("mixgen-off", 1): (90.0, 4.0),
           ("mixgen-on", 0): (120.0, 6.0), ("mixgen-on", 1): (80.0, 3.0)}  # fmt: skip
    earlier = tmp_path / "earlier.json"
    # mixgen-on's fingerprint recorded and current; mixgen-off's report predates fingerprints
    earlier.write_text(json.dumps(_earlier(spec, old, {"mixgen-on": arm_fingerprint(spec, on)})))
    data = report.build(spec, earlier)
    rsum = data["metrics"]["zeroshot.rsum"]
    assert rsum["mixgen-off"]["values"] == {"0": 100.0, "1": 90.0}
    assert rsum["mixgen-on"]["vs_control"]["diffs"] == {"0": 20.0, "1": -10.0}  # 120-100, 80-90
    assert data["missing"] == [] and len(data["carried"]) == 3
    legacy = [c for c in data["carried"] if "no recipe fingerprint" in c]
    assert len(legacy) == 1 and legacy[0].startswith("mixgen=off, seed 1: from ") and "commit abc1234" in legacy[0]
    assert data["fingerprints"] == {"mixgen-off": arm_fingerprint(spec, off), "mixgen-on": arm_fingerprint(spec, on)}

    # an arm whose recipe changed since that report is not carried, and the report says why
    earlier.write_text(json.dumps(_earlier(spec, old, {"mixgen-on": "0123456789abcdef"})))
    data = report.build(spec, earlier)
    assert data["metrics"]["zeroshot.rsum"]["mixgen-on"]["n"] == 0
    assert sum("recipe changed since" in m for m in data["missing"]) == 2 and len(data["carried"]) == 1
    # the fingerprint follows the recipe (its overrides, the level's), not where the runs are kept
    moved = load_spec(REPO / SMOKE, [f"out={tmp_path / 'elsewhere'}", f"results={tmp_path / 'res'}"])
    assert arm_fingerprint(moved, arms(moved)[1]) == arm_fingerprint(spec, on)
    longer = load_spec(REPO / SMOKE, [*common, "pretrain.overrides=[train.max_steps=5]"])
    assert arm_fingerprint(longer, arms(longer)[1]) != arm_fingerprint(spec, on)
    recipe = tmp_path / "clip_tiny.yaml"  # the same recipe file, then one value in it changed
    recipe.write_text((REPO / spec.pretrain.config).read_text())
    copy = load_spec(REPO / SMOKE, [*common, f"pretrain.config={recipe}"])
    before = arm_fingerprint(copy, arms(copy)[1])
    recipe.write_text(recipe.read_text().replace("lr: ", "lr: 0.5 #", 1))
    assert arm_fingerprint(copy, arms(copy)[1]) != before
    assert arm_fingerprint(spec, off) != arm_fingerprint(spec, on)

    # another experiment's report is refused by name; from the command line the report lists what it carried
    earlier.write_text(json.dumps({**_earlier(spec, old, {}), "name": "mixgen_models"}))
    with pytest.raises(ConfigError, match="a report of experiment 'mixgen_models', not 'smoke'"):
        report.build(spec, earlier)
    earlier.write_text(json.dumps(_earlier(spec, old, {})))
    assert main(["report", SMOKE, *common, "--carry", str(earlier)]) == 0
    md = (tmp_path / "res" / "smoke" / "README.md").read_text()
    assert "Runs carried from an earlier report" in md and md.count(f"from {earlier}") == 1  # one line per source
    carried_line = next(line for line in md.splitlines() if f"from {earlier}" in line)
    assert carried_line.endswith(": mixgen=off seeds 1; mixgen=on seeds 0, 1")  # off seed 0 has its folder
    # regenerated from its own results.json, the report still names the first source, not itself
    again = tmp_path / "res" / "smoke" / "results.json"
    assert main(["report", SMOKE, *common, "--carry", str(again)]) == 0
    md = (tmp_path / "res" / "smoke" / "README.md").read_text()
    assert md.count(f"from {earlier}") == 1 and f"from {again}" not in md
    assert json.loads((tmp_path / "res" / "smoke" / "results.json").read_text())["commit"]


def test_run_with_carry_does_not_rerun_carried_runs(tmp_path, capsys):
    from experiments.__main__ import main

    common = [f"out={tmp_path / 'runs'}", f"results={tmp_path / 'res'}"]
    spec = load_spec(REPO / SMOKE, common)
    old = {("mixgen-off", 0): (1.0, 1.0), ("mixgen-off", 1): (90.0, 4.0),
           ("mixgen-on", 0): (120.0, 6.0), ("mixgen-on", 1): (80.0, 3.0)}  # fmt: skip
    earlier = tmp_path / "earlier.json"
    from experiments.runner import arm_fingerprint

    # mixgen-off's recipe changed since (another fingerprint): its runs are not carried, so they run again
    fps = {"mixgen-off": "0123456789abcdef", "mixgen-on": arm_fingerprint(spec, arms(spec)[1])}
    earlier.write_text(json.dumps(_earlier(spec, old, fps)))
    assert main(["run", SMOKE, *common, "--carry", str(earlier), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("not run, carried: mixgen=on, seed") == 2 and "carried: mixgen=off" not in out
    would = [line for line in out.splitlines() if line.startswith("would run") and "run.dir=" in line]
    assert would and all("/mixgen-off/seed" in line for line in would)
    assert {s for s in (0, 1) if any(f"/mixgen-off/seed{s}/" in line for line in would)} == {0, 1}
    # without --carry every run is planned
    assert main(["run", SMOKE, *common, "--dry-run"]) == 0
    assert any("/mixgen-on/seed1/" in line for line in capsys.readouterr().out.splitlines())


def test_report_keeps_the_curves_of_fully_carried_arms(tmp_path):
    from experiments import report

    curve = "curves=[{stage: zeroshot, key: loss, file: metrics.jsonl}]"
    spec = load_spec(REPO / SMOKE, [f"out={tmp_path / 'runs'}", f"results={tmp_path / 'res'}", curve])
    root = Path(spec.out) / "smoke" / "mixgen-off" / "seed0" / "zeroshot"  # one run of mixgen-off on disk
    root.mkdir(parents=True)
    (root / "results.json").write_text(json.dumps({"splits": {"test": {"rsum": 100.0, "txt_r1": 5.0}}}))
    (root / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n')
    old = {("mixgen-off", 1): (90.0, 4.0), ("mixgen-on", 0): (120.0, 6.0), ("mixgen-on", 1): (80.0, 3.0)}
    earlier = _earlier(spec, old, {})
    pts = [{"step": 1, "mean": 9.0, "half": 1.0, "n": 2}]
    off_pts = [{"step": 1, "mean": 7.0, "half": 0, "n": 2}]
    earlier["curves"] = {"zeroshot.loss": {"mixgen-on": pts, "mixgen-off": off_pts}}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    out = report.write(spec, carry=path)
    data = json.loads((out / "results.json").read_text())
    got = data["curves"]["zeroshot.loss"]
    assert got["mixgen-on"] == pts  # every seed carried: the earlier report's curve
    assert [p["mean"] for p in got["mixgen-off"]] == [3.0, 2.0]  # a seed on disk: the curve is read from disk
    assert data["curves_carried"] == ["mixgen-on"]
    assert "The curves of mixgen=on are the earlier report's" in (out / "README.md").read_text()


def test_a_difference_metric_is_paired_per_run(tmp_path):
    """A generalisation gap "train - test" is taken within each run, then summarised and paired like any metric."""
    gap = "zeroshot.rsum - zeroshot.txt_r1"
    spec = load_spec(REPO / SMOKE, [f"out={tmp_path / 'runs'}", f"results={tmp_path / 'res'}",
                                    f"metrics=[{gap}]", f"lower_is_better=[{gap}]"])  # fmt: skip
    from experiments import practice, report

    values = {("mixgen-off", 0): (100.0, 30.0), ("mixgen-off", 1): (90.0, 10.0),
              ("mixgen-on", 0): (95.0, 35.0), ("mixgen-on", 1): (92.0, 12.0)}  # fmt: skip
    for (arm, seed), (rsum, r1) in values.items():
        root = Path(spec.out) / "smoke" / arm / f"seed{seed}" / "zeroshot"
        root.mkdir(parents=True)
        (root / "results.json").write_text(json.dumps({"splits": {"test": {"rsum": rsum, "txt_r1": r1}}}))
    out = report.write(spec)
    data = json.loads((out / "results.json").read_text())
    entry = data["metrics"][gap]
    assert entry["mixgen-off"]["values"] == {"0": 70.0, "1": 80.0}
    vs = entry["mixgen-on"]["vs_control"]
    assert vs["diffs"] == {"0": -10.0, "1": 0.0}  # (95-35)-(100-30), (92-12)-(90-10)
    assert vs["better"] == 1  # only the seed whose gap shrank
    assert (out / "zeroshot.rsum_-_zeroshot.txt_r1.png").is_file()
    # a gap that shrinks on every seed is a "use" when lower is better, an "avoid" otherwise
    assert practice.verdict({"n": 3, "ci95": [-9.0, -1.0]}, lower_is_better=True) == "use"
    assert practice.verdict({"n": 3, "ci95": [-9.0, -1.0]}) == "avoid"
    assert "(lower is better)" in "\n".join(practice.section(spec, data))
    with pytest.raises(ConfigError, match="'nosuch.top1'"):
        load_spec(REPO / SMOKE, ["metrics=[zeroshot.rsum - nosuch.top1]"])
    with pytest.raises(ConfigError, match="lower_is_better: 'zeroshot.rsum'"):
        load_spec(REPO / SMOKE, ["lower_is_better=[zeroshot.rsum]", f"metrics=[{gap}]"])


def test_curves_are_the_mean_over_seeds_at_the_steps_every_seed_logged(tmp_path):
    spec = load_spec(REPO / SMOKE, [f"out={tmp_path / 'runs'}", f"results={tmp_path / 'res'}",
                                    'curves=[{stage: pretrain, key: loss, file: metrics.jsonl}]'])  # fmt: skip
    from experiments import report

    logs = {0: [(10, 4.0), (20, 3.0), (30, 2.0)], 1: [(10, 2.0), (20, 1.0)]}  # seed 1 stopped before step 30
    for seed, rows in logs.items():
        root = Path(spec.out) / "smoke" / "mixgen-off" / f"seed{seed}" / "pretrain"
        root.mkdir(parents=True)
        text = "".join(json.dumps({"step": st, "loss": v, "lr": 0.1}) + "\n" for st, v in rows)
        (root / "metrics.jsonl").write_text(text + '{"step": 40, "lo')  # a torn last line is skipped
    out = report.write(spec)
    got = json.loads((out / "results.json").read_text())["curves"]["pretrain.loss"]
    assert [(p["step"], p["mean"], p["n"]) for p in got["mixgen-off"]] == [(10, 3.0, 2), (20, 2.0, 2)]
    # t_.975,1 * s / sqrt(n) with s = sqrt(2), n = 2
    assert got["mixgen-off"][0]["half"] == pytest.approx(12.7062047 * 2**0.5 / 2**0.5, rel=1e-4)
    assert got["mixgen-on"] == []
    assert (out / "curve_pretrain.loss.png").is_file() and "curve_pretrain.loss.png" in (out / "README.md").read_text()
    with pytest.raises(ConfigError, match="curves\\[0\\]: stage 'nosuch'"):
        load_spec(REPO / SMOKE, ["curves=[{stage: nosuch, key: loss}]"])


def test_average_over_a_factor_is_taken_per_seed_then_paired(tmp_path):
    """Office-31's "Avg" column: per seed, the mean over the transfer tasks; the interval is over seeds."""
    domain = '{name: domain, levels: [{name: a}, {name: b}]}'
    ctrl = '{name: mixgen, control: "off", levels: [{name: "off"}, {name: "on"}]}'
    spec = load_spec(REPO / SMOKE, [f"out={tmp_path / 'runs'}", f"results={tmp_path / 'res'}", "seeds=[0, 1, 2]",
                                    f"factors=[{domain}, {ctrl}]", "average_over=domain"])  # fmt: skip
    from experiments import practice, report

    rsum = {("a", "off"): [10, 20, 30], ("b", "off"): [30, 40, 50],
            ("a", "on"): [14, 22, 33], ("b", "on"): [32, 46], }  # fmt: skip  (b/on seed 2 missing)
    for (dom, mix), vals in rsum.items():
        for seed, v in enumerate(vals):
            root = Path(spec.out) / "smoke" / f"domain-{dom}__mixgen-{mix}" / f"seed{seed}" / "zeroshot"
            root.mkdir(parents=True)
            (root / "results.json").write_text(json.dumps({"splits": {"test": {"rsum": v, "txt_r1": 1.0}}}))
    out = report.write(spec)
    data = json.loads((out / "results.json").read_text())
    avg = data["averaged"]["zeroshot.rsum"]
    assert avg["mixgen=off"]["values"] == {"0": 20.0, "1": 30.0, "2": 40.0}
    assert avg["mixgen=on"]["values"] == {"0": 23.0, "1": 34.0}  # seed 2 lacks domain b: left out, not half-averaged
    vs = avg["mixgen=on"]["vs_control"]
    assert vs["control"] == "mixgen=off" and vs["diffs"] == {"0": 3.0, "1": 4.0} and vs["better"] == 2
    assert vs["ci95_half"] == pytest.approx(12.7062047 * (0.5**0.5) / 2**0.5, rel=1e-4)  # sd of (3, 4) = sqrt(.5)
    assert "mean over domain" in (out / "README.md").read_text()
    assert any("mixgen=on, mean over domain" in line for line in practice.section(spec, data))
    with pytest.raises(ConfigError, match="average_over: 'mixgen'"):
        load_spec(REPO / SMOKE, [f"factors=[{domain}, {ctrl}]", "average_over=mixgen"])


def test_comparisons_pair_two_treated_levels_seed_by_seed(tmp_path):
    """"alpha 0 vs the default alpha": a paired difference between two treated arms, per arm and per averaged
    group, with the practice guide's verdict; a lower-is-better metric counts a decrease as better."""
    domain = '{name: domain, levels: [{name: a}, {name: b}]}'
    ctrl = '{name: mixgen, control: "off", levels: [{name: "off"}, {name: "on"}, {name: "half"}]}'
    pairs = 'comparisons=[{level: half, vs: "on"}]'
    base = [f"out={tmp_path / 'runs'}", f"results={tmp_path / 'res'}", "seeds=[0, 1, 2]",
            f"factors=[{domain}, {ctrl}]", "average_over=domain", pairs]  # fmt: skip
    spec = load_spec(REPO / SMOKE, base)
    from experiments import practice, report

    rsum = {("a", "off"): [10, 20, 30], ("b", "off"): [30, 40, 50], ("a", "on"): [14, 22, 33],
            ("b", "on"): [32, 46, 52], ("a", "half"): [20, 27, 40], ("b", "half"): [36, 50, 57]}  # fmt: skip
    for (dom, mix), vals in rsum.items():
        for seed, v in enumerate(vals):
            root = Path(spec.out) / "smoke" / f"domain-{dom}__mixgen-{mix}" / f"seed{seed}" / "zeroshot"
            root.mkdir(parents=True)
            (root / "results.json").write_text(json.dumps({"splits": {"test": {"rsum": v, "txt_r1": -v}}}))
    out = report.write(spec)
    data = json.loads((out / "results.json").read_text())
    comps = {(e["arm"], e["vs"]): e for e in data["comparisons"]["zeroshot.rsum"]}
    assert set(comps) == {("domain-a__mixgen-half", "domain-a__mixgen-on"),
                          ("domain-b__mixgen-half", "domain-b__mixgen-on")}  # fmt: skip  (never vs off)
    a = comps[("domain-a__mixgen-half", "domain-a__mixgen-on")]
    assert a["diffs"] == {"0": 6.0, "1": 5.0, "2": 7.0} and a["better"] == 3 and a["mean"] == pytest.approx(6.0)
    assert a["ci95_half"] == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-4)  # sd of (6, 5, 7) = 1
    avg = data["averaged_comparisons"]["zeroshot.rsum"]
    assert len(avg) == 1 and avg[0]["arm"] == "mixgen=half" and avg[0]["vs"] == "mixgen=on"
    assert avg[0]["diffs"] == {"0": 5.0, "1": 4.5, "2": 6.0}  # (6 + 4) / 2, (5 + 4) / 2, (7 + 5) / 2
    lower = {(e["arm"], e["vs"]): e for e in data["comparisons"]["zeroshot.txt_r1"]}
    assert lower[("domain-a__mixgen-half", "domain-a__mixgen-on")]["better"] == 0  # -6, -5, -7: all worse
    text = (out / "README.md").read_text()
    assert "paired comparisons between arms, mean over domain" in text
    assert "| domain=a, mixgen=half | domain=a, mixgen=on | 3 | +6.00 ± 2.48 |" in text
    guide = "\n".join(practice.section(spec, data))
    assert "- mixgen=half, mean over domain, vs mixgen=on, zeroshot.rsum: **use**; paired difference +5.17" in guide
    assert "- domain=b, mixgen=half vs domain=b, mixgen=on, zeroshot.rsum: **use**" in guide
    for bad in ("[{level: half, vs: half}]", "[{level: half, vs: nosuch}]"):
        with pytest.raises(ConfigError, match="comparisons\\[0\\]: level 'half' and vs"):
            load_spec(REPO / SMOKE, [*base[:-1], f"comparisons={bad}"])


def test_untrained_style_network_is_refused(tmp_path):
    from safetensors.torch import save_file

    from experiments.runner import check_requirements
    from experiments.spec import Requirement

    ckpt = tmp_path / "style_checkpoint.safetensors"
    save_file({"transformer.w": torch.zeros(2)}, str(ckpt), metadata={"vgg_weights": "random"})
    spec = load_spec(REPO / "experiments/recipes/style_policies_stl10.yaml")
    assert spec.requires[0].refuse_metadata == {"vgg_weights": "random"}  # the recipe guards against it
    spec.requires = [Requirement(str(ckpt), "a trained style network", "", {"vgg_weights": "random"})]
    with pytest.raises(ConfigError, match="is not one \\(vgg_weights=random\\)"):
        check_requirements(spec)
    save_file({"transformer.w": torch.zeros(2)}, str(ckpt), metadata={"vgg_weights": "torchvision"})
    check_requirements(spec)  # trained against the real loss network: accepted


def test_practice_guide_states_verdicts_from_intervals(tmp_path):
    from experiments import practice, report

    spec = load_spec(REPO / SMOKE, [f"out={tmp_path / 'runs'}", f"results={tmp_path / 'res'}"])
    # on beats off by 10 +- 1 on three seeds: "use"; txt_r1 differs by -1, +1, 0: "no evidence either way"
    for arm, rsum, r1 in (("mixgen-off", (100, 110, 120), (5, 5, 5)), ("mixgen-on", (110, 121, 129), (4, 6, 5))):
        for seed, (v, w) in enumerate(zip(rsum, r1)):
            root = Path(spec.out) / "smoke" / arm / f"seed{seed}" / "zeroshot"
            root.mkdir(parents=True)
            (root / "results.json").write_text(json.dumps({"splits": {"test": {"rsum": v, "txt_r1": w}}}))
    spec.seeds = [0, 1, 2]
    report.write(spec)
    text = practice.generate([REPO / SMOKE, REPO / "experiments/recipes/style_policies_stl10.yaml"], tmp_path / "res")
    assert "smoke.yaml`: partly measured" not in text  # all 6 planned runs finished
    spec.seeds = [0, 1, 2, 3]  # a fourth seed planned, not run: counted as missing, named under "unknown"
    report.write(spec)
    partial = practice.generate([REPO / SMOKE], tmp_path / "res").split("What remains unknown")[1]
    assert "smoke.yaml`: partly measured; 2 of 8 planned runs did not finish" in partial
    spec.seeds = [0, 1, 2]
    report.write(spec)
    assert "mixgen=on vs mixgen=off, zeroshot.rsum: **use**; paired difference +10.00" in text
    assert "zeroshot.txt_r1: **no evidence either way**" in text
    assert "style_policies_stl10.yaml" in text.split("What remains unknown")[1]
    assert practice.verdict({"n": 3, "ci95": [-5.0, -1.0]}) == "avoid"
    # an unmeasured recipe says why: a requirement that is missing, or (all present) only the compute
    lacking = tmp_path / "lacking.yaml"
    lacking.write_text((REPO / SMOKE).read_text().replace("name: smoke", "name: lacking")
                       + f"requires: [{{path: {tmp_path / 'nosuch.safetensors'}, what: a trained thing}}]\n")
    present = tmp_path / "present.yaml"
    present.write_text((REPO / SMOKE).read_text().replace("name: smoke", "name: present")
                       + f"requires: [{{path: {lacking}, what: a file that exists}}]\n")
    unknown = practice.generate([lacking, present], tmp_path / "res").split("What remains unknown")[1]
    assert "requires a trained thing" in unknown and "not run here (CPU time)" in unknown
    assert "a file that exists" not in unknown
    # the recipe gained an arm after its report was written: the guide still renders, and names the arm as unknown
    grown = tmp_path / "grown.yaml"
    grown.write_text((REPO / SMOKE).read_text().replace(
        '{name: "on", pretrain: [mixgen.enabled=true]}',
        '{name: "on", pretrain: [mixgen.enabled=true]}\n      - {name: half, pretrain: [mixgen.ratio=0.5]}'))
    text = practice.generate([grown], tmp_path / "res")
    assert "paired difference +10.00" in text.split("What remains unknown")[0]
    assert "the arms mixgen=half are in the recipe but not in its report yet" in text.split("What remains unknown")[1]


def test_drop_checkpoints_only_where_a_weights_copy_remains(tmp_path):
    from experiments.runner import STAGE_RECORD, drop_checkpoints
    from pretrain.export import export_safetensors, load_state

    def stage(name: str, done: bool, export: bool) -> Path:
        d = tmp_path / name
        (d / "checkpoints" / "step3").mkdir(parents=True)
        (d / "checkpoints" / "step3" / "states.pt").write_bytes(b"x" * 1000)
        if done:
            (d / STAGE_RECORD).write_text("{}")
        if export:
            export_safetensors({"w": torch.arange(4.0)}, d / "export.safetensors", {"model": {"name": "clip"}})
        return d

    finished, no_copy, running = stage("pretrain", True, True), stage("zeroshot", True, False), stage("ft", False, True)
    assert drop_checkpoints(tmp_path) == 1000
    assert not (finished / "checkpoints").exists()
    assert (no_copy / "checkpoints").is_dir() and (running / "checkpoints").is_dir()
    # the pruned run folder still initializes a fine-tune, from its export
    torch.testing.assert_close(load_state(str(finished))["w"], torch.arange(4.0))
    # while checkpoints exist they win over the export (a stopped run initializes from its newest step)
    with pytest.raises(FileNotFoundError, match="checkpoints/latest"):
        load_state(str(running))


def test_a_half_built_data_set_is_rebuilt_not_read(tmp_path):
    from experiments.runner import data_dir, stages

    spec = load_spec(REPO / SMOKE, [f"out={tmp_path}"])
    arm = arms(spec)[0]
    (data_dir(spec, arm) / "train").mkdir(parents=True)  # what a build that died before its first shard leaves
    listed = stages(spec, arm, 0)
    assert listed[0].kind == "data" and not listed[0].done()
    assert "data.shards={train_shards}" in listed[1].overrides  # filled in once the data stage has finished


def _t_quantile_by_integration(df: float) -> float:
    """t_{0.975, df} from the density by midpoint integration and bisection: independent of experiments.stats."""

    def cdf(x: float) -> float:
        c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        h = x / 4000
        return 0.5 + h * sum(c * (1 + ((i + 0.5) * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(4000))

    lo, hi = 1.0, 20.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < 0.975 else (lo, mid)
    return lo


def test_welch_and_slope_match_independent_computations():
    from experiments.stats import slope, welch

    for df in (1.5, 2.4, 3.98, 7.3, 45.0):
        assert t_quantile_975(df) == pytest.approx(_t_quantile_by_integration(df), abs=2e-4)
    # Welch by hand: a = (9, 16.1, -0.9), b = (-31.7, -16.2, -27.3)
    a, b = [9.0, 16.1, -0.9], [-31.7, -16.2, -27.3]
    va = sum((x - sum(a) / 3) ** 2 for x in a) / 2 / 3
    vb = sum((x - sum(b) / 3) ** 2 for x in b) / 2 / 3
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    w = welch(a, b)
    assert w.estimate == pytest.approx(sum(a) / 3 - sum(b) / 3) and w.df == pytest.approx(df)
    assert w.half == pytest.approx(_t_quantile_by_integration(df) * math.sqrt(va + vb), rel=1e-3)
    assert w.excludes_zero() and math.isnan(welch([1.0], b).half)
    # slope against numpy's least squares and the textbook standard error
    import numpy as np

    xs, ys = [1.0, 1.0, 1.4, 1.4, 1.7, 2.0, 2.0], [9.0, 16.0, 3.0, -2.0, -10.0, -31.0, -16.0]
    design = np.stack([np.ones(len(xs)), np.array(xs)], 1)
    coef, res, *_ = np.linalg.lstsq(design, np.array(ys), rcond=None)
    se = math.sqrt(res[0] / (len(xs) - 2) * np.linalg.inv(design.T @ design)[1, 1])
    fit = slope(xs, ys)
    assert fit.estimate == pytest.approx(coef[1]) and fit.df == len(xs) - 2
    assert fit.half == pytest.approx(2.5706 * se, rel=1e-4)  # t_{0.975, 5}
    with pytest.raises(ValueError, match="every x is the same"):
        slope([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])


def test_report_and_guide_give_the_trend_along_the_x_factor(tmp_path):
    """Data-efficiency layout: the effect at each fraction vs at the largest, and the slope on log10 fraction."""
    from experiments import practice, report

    recipe = REPO / "experiments/recipes/mixgen_data_efficiency.yaml"
    spec = load_spec(recipe, [f"out={tmp_path / 'runs'}", f"results={tmp_path / 'res'}"])
    # on − off per seed: +20, +22, +24 at 10 %; nothing at 25 %; +5, +7, +3 at 50 %; -10, -12, -8 at 100 %
    effects = {"10": (20, 22, 24), "50": (5, 7, 3), "100": (-10, -12, -8)}
    for fraction, eff in effects.items():
        for seed, e in enumerate(eff):
            for arm, v in (("off", 200.0 + seed), ("on", 200.0 + seed + e)):
                root = Path(spec.out) / spec.name / f"fraction-{fraction}__mixgen-{arm}" / f"seed{seed}"
                for ev in ("zeroshot", "finetuned"):
                    (root / ev).mkdir(parents=True)
                    (root / ev / "results.json").write_text(json.dumps({"splits": {"test": {"rsum": v}}}))
    out = report.write(spec)
    trend = json.loads((out / "results.json").read_text())["trends"]["zeroshot.rsum"][0]
    assert trend["series"] == "mixgen=on" and trend["ref"] == "100" and trend["log_x"] and trend["n"] == 9
    by_level = {p["level"]: p for p in trend["points"]}
    assert by_level["10"]["minus_ref"]["estimate"] == pytest.approx(32.0)  # 22 - (-10)
    assert by_level["25"]["effect"]["n"] == 0 and "minus_ref" in by_level["25"]
    assert "minus_ref" not in by_level["100"]
    xs = [1.0] * 3 + [math.log10(50)] * 3 + [2.0] * 3
    ys = [20, 22, 24, 5, 7, 3, -10, -12, -8]
    mx, my = sum(xs) / 9, sum(ys) / 9
    expected = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    assert trend["slope"]["estimate"] == pytest.approx(expected) and trend["slope"]["ci95"][1] < 0
    assert "how the paired difference changes with fraction" in (out / "README.md").read_text()
    per_arm = json.loads((out / "results.json").read_text())["metrics"]["zeroshot.rsum"]
    series, ticks = report._plot_series(spec, per_arm, diff=True)  # log_x: the plot's axis is log10 too
    assert ticks == {math.log10(x): str(x) for x in (10, 25, 50, 100)}
    assert [p[:2] for p in series["on"]] == [(1.0, 22.0), (math.log10(50), 5.0), (2.0, -10.0)]
    text = practice.generate([recipe], tmp_path / "res")
    assert "along fraction, zeroshot.rsum: **the effect is larger the smaller fraction**" in text
    assert "## At a glance" in text and "(mixgen_data_efficiency)" in text.split("## mixgen_data_efficiency")[0]
