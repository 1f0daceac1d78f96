"""``python -m experiments report <yaml>``: tables, paired differences, plots and a JSON of every number.

Written to ``<results>/<name>/``: ``README.md`` (per metric: mean ± 95 % t-interval over seeds with n and the
per-seed values, then the paired differences against the control arm, seed by seed), ``<metric>.png`` (metric vs
the x factor or vs arm, error bars), ``<metric>_diff.png`` (the paired differences, with the zero line) and
``results.json``. Only finished runs count; n says how many there were, and missing runs are listed.

Run folders are bulky and get deleted (a scratch purge, a fresh machine); ``--carry <an earlier results.json>``
keeps the numbers of runs whose folders are gone, when the earlier report holds them for the same arm, and lists
each carried run with where it came from. An arm whose recipe changed since (its fingerprint differs) is not
carried; a report written before fingerprints were kept is carried with that said beside it.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments.plot import Point, errorbar_plot
from experiments.runner import arm_fingerprint, read_metrics, run_dir
from experiments.spec import Arm, ExperimentSpec, Factor, arms, control_factor, control_of, swap_level
from experiments.stats import Summary, paired, slope, summarize, welch
from launch.config import ConfigError


def collect(
    spec: ExperimentSpec, carry: Path | None = None, fingerprints: dict[str, str] | None = None
) -> tuple[dict[str, dict[str, dict[int, float]]], list[str], list[str]]:
    """``values[metric][arm name][seed]`` of every finished run (or carried from ``carry``), a line per missing
    run and a line per carried one. ``fingerprints``: each arm's :func:`arm_fingerprint`, if already known."""
    values: dict[str, dict[str, dict[int, float]]] = {m: {} for m in spec.metrics}
    earlier = _earlier_report(spec, carry) if carry is not None else None
    if earlier is not None and fingerprints is None:
        fingerprints = {a.name: arm_fingerprint(spec, a) for a in arms(spec)}
    fingerprints = fingerprints or {}
    missing, carried = [], []
    for arm in arms(spec):
        for seed in spec.seeds:
            got, gone, why = _one_run(spec, arm, seed, earlier, carry, fingerprints.get(arm.name, ""))
            if got is None:
                missing.append(f"{arm.label}, seed {seed}: {gone}{why}")
                continue
            if gone:
                carried.append(f"{arm.label}, seed {seed}: {why}")
            for m, v in got.items():
                values[m].setdefault(arm.name, {})[seed] = v
    return values, missing, carried


def carried_runs(
    spec: ExperimentSpec, carry: Path, fingerprints: dict[str, str] | None = None
) -> dict[tuple[str, int], str]:
    """``(arm name, seed)`` of each run whose folder is gone and whose numbers ``carry`` holds for the current
    recipe, with where they come from: ``run --carry`` does not run these again. ``fingerprints``: each arm's
    :func:`arm_fingerprint`, if already known."""
    earlier = _earlier_report(spec, carry)
    out = {}
    for arm in arms(spec):
        fingerprint = fingerprints[arm.name] if fingerprints else arm_fingerprint(spec, arm)
        for seed in spec.seeds:
            got, gone, why = _one_run(spec, arm, seed, earlier, carry, fingerprint)
            if got is not None and gone:
                out[(arm.name, seed)] = why
    return out


def _one_run(
    spec: ExperimentSpec, arm: Arm, seed: int, earlier: dict[str, Any] | None, carry: Path | None, fingerprint: str
) -> tuple[dict[str, float] | None, str, str]:
    """(metrics or None, why the folder could not be read or "", where carried metrics came from or why not)."""
    try:
        return read_metrics(spec, arm, seed), "", ""
    except (OSError, KeyError, ValueError) as exc:
        if earlier is None or carry is None:
            return None, str(exc), ""
        found, why = _carried(spec, earlier, carry, fingerprint, arm, seed)
        return found, str(exc), why


def _carried_by_source(carried: list[str]) -> list[str]:
    """The lines "<arm label>, seed <s>: <source>" grouped per source: "<source>: <arm> seeds 0, 1; ..."."""
    groups: dict[str, dict[str, list[str]]] = {}
    for line in carried:
        run, _, source = line.partition(": ")
        label, _, seed = run.rpartition(", seed ")
        groups.setdefault(source, {}).setdefault(label, []).append(seed)
    return [f"{source}: " + "; ".join(f"{label} seeds {', '.join(seeds)}" for label, seeds in runs.items())
            for source, runs in groups.items()]  # fmt: skip


def _earlier_report(spec: ExperimentSpec, path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--carry {path}: cannot read it as a report's results.json ({exc})") from exc
    if not isinstance(data, dict) or data.get("name") != spec.name:
        got = data.get("name") if isinstance(data, dict) else None
        raise ConfigError(f"--carry {path}: a report of experiment {got!r}, not {spec.name!r}")
    return data


def _carried(
    spec: ExperimentSpec, earlier: dict[str, Any], src: Path, fingerprint: str, arm: Arm, seed: int
) -> tuple[dict | None, str]:
    """One run's metrics from the earlier report ``src``, and where they came from; (None, why not) when it
    cannot be (``fingerprint``: the arm's now)."""
    levels = {a.get("name"): a.get("levels") for a in earlier.get("arms", [])}
    if levels.get(arm.name) != {f: lv.name for f, lv in arm.levels}:
        return None, ""
    was = earlier.get("fingerprints", {}).get(arm.name)
    if was is not None and was != fingerprint:
        return None, f" (not carried from {src}: this arm's recipe changed since, fingerprint {was})"
    got = {}
    for metric in spec.metrics:
        value = earlier.get("metrics", {}).get(metric, {}).get(arm.name, {}).get("values", {}).get(str(seed))
        if value is None:
            return None, ""
        got[metric] = float(value)
    # a run the earlier report itself carried keeps its first source: a report regenerated from its own
    # results.json must not pass off old runs as made at its date and commit
    prefix = f"{arm.label}, seed {seed}: "
    first = next((c[len(prefix) :] for c in earlier.get("carried", []) if c.startswith(prefix)), None)
    if first:
        return got, first
    note = "" if was is not None else "; that report kept no recipe fingerprint, so the recipe is not checked"
    return got, f"from {src} (generated {earlier.get('generated', '?')}, commit {earlier.get('commit', '?')}){note}"


def _commit() -> str | None:
    """The project's commit, for a report's provenance (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _pm(s: Summary, digits: int = 2) -> str:
    if s.n == 0:
        return "—"
    if not math.isfinite(s.half):
        return f"{s.mean:.{digits}f} (n=1, no interval)"
    return f"{s.mean:.{digits}f} ± {s.half:.{digits}f}"


def _ci(s: Summary, digits: int = 2) -> str:
    return f"[{s.low:.{digits}f}, {s.high:.{digits}f}]" if s.n >= 2 else "—"


def _seeds(values: dict[int, float], signed: bool = False) -> str:
    fmt = "{:+.2f}" if signed else "{:.2f}"
    return ", ".join(fmt.format(values[s]) for s in sorted(values)) or "—"


def build(spec: ExperimentSpec, carry: Path | None = None) -> dict[str, Any]:
    """Every number of the report: per metric and arm the values by seed and their summary, and the paired
    differences against the control arm; runs whose folders are gone come from ``carry`` where it has them."""
    fingerprints = {a.name: arm_fingerprint(spec, a) for a in arms(spec)}
    values, missing, carried = collect(spec, carry, fingerprints)
    out: dict[str, Any] = {"name": spec.name, "claim": spec.claim, "seeds": spec.seeds, "missing": missing,
                           "carried": carried}  # fmt: skip
    out["arms"] = [{"name": a.name, "label": a.label, "levels": {f: lv.name for f, lv in a.levels}} for a in arms(spec)]
    out["fingerprints"] = fingerprints
    out["metrics"] = {}
    for metric in spec.metrics:
        per_arm = {}
        for arm in arms(spec):
            v = values[metric].get(arm.name, {})
            entry: dict[str, Any] = {
                "values": {str(s): v[s] for s in sorted(v)},
                **summarize(list(v.values())).as_dict(),
            }
            ctrl = control_of(spec, arm)
            if ctrl is not None:
                lower = metric in spec.lower_is_better
                entry["vs_control"] = _vs_control(ctrl.name, v, values[metric].get(ctrl.name, {}), lower)
            per_arm[arm.name] = entry
        out["metrics"][metric] = per_arm
        lower = metric in spec.lower_is_better
        if spec.comparisons:
            out.setdefault("comparisons", {})[metric] = _comparisons(spec, values[metric], lower)
        if spec.average_over:
            means = _average_means(spec, values[metric])
            out.setdefault("averaged", {})[metric] = _averaged(spec, means, lower)
            if spec.comparisons:
                out.setdefault("averaged_comparisons", {})[metric] = _comparisons(spec, means, lower, _group_key)
        trends = _trends(spec, per_arm)
        if trends:
            out.setdefault("trends", {})[metric] = trends
    return out


def _vs_control(control: str, treated: dict[int, float], base: dict[int, float], lower: bool) -> dict[str, Any]:
    """The paired difference treated − control over their common seeds, and how many seeds improved."""
    diffs, summary = paired(treated, base)
    better = sum((d < 0) if lower else (d > 0) for d in diffs.values())
    return {"control": control, "diffs": {str(k): d for k, d in diffs.items()}, "better": better,
            **summary.as_dict()}  # fmt: skip


def _arm_key(spec: ExperimentSpec, arm: Arm) -> str:
    return arm.name


def _comparisons(
    spec: ExperimentSpec,
    values: dict[str, dict[int, float]],
    lower: bool,
    key: Callable[[ExperimentSpec, Arm], str] = _arm_key,
) -> list[dict[str, Any]]:
    """The recipe's ``comparisons``: per pair of arms (or, with ``key=_group_key``, of averaged groups) that differ
    only in the control factor's level, ``level`` − ``vs`` over their common seeds."""
    factor = control_factor(spec)
    if factor is None:  # validation allows comparisons only with a control factor
        return []
    out, seen = [], set()
    for comp in spec.comparisons:
        for arm in arms(spec):
            if arm.level(factor.name).name != comp.level:
                continue
            a, b = key(spec, arm), key(spec, swap_level(spec, arm, comp.vs))
            if (a, b) in seen:
                continue
            seen.add((a, b))
            out.append({"arm": a, "vs": b, **_vs_control(b, values.get(a, {}), values.get(b, {}), lower)})
    return out


def _group_key(spec: ExperimentSpec, arm: Arm) -> str:
    """The averaged group ``arm`` belongs to: its levels other than the ``average_over`` factor's."""
    return ", ".join(f"{f}={lv.name}" for f, lv in arm.levels if f != spec.average_over)


def _average_means(spec: ExperimentSpec, values: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """Per averaged group, each seed's mean over the ``average_over`` levels (only seeds with every level)."""
    nlevels = len(next(f for f in spec.factors if f.name == spec.average_over).levels)
    per_seed: dict[str, dict[int, list[float]]] = {}
    for arm in arms(spec):
        g = per_seed.setdefault(_group_key(spec, arm), {})
        for seed, v in values.get(arm.name, {}).items():
            g.setdefault(seed, []).append(v)
    return {k: {s: sum(v) / len(v) for s, v in g.items() if len(v) == nlevels} for k, g in per_seed.items()}


def _averaged(spec: ExperimentSpec, means: dict[str, dict[int, float]], lower: bool) -> dict[str, Any]:
    """Per group of arms that differ only in the ``average_over`` level (``means``: :func:`_average_means`), the
    per-seed means summarised over seeds and paired with the control group."""
    controls = {_group_key(spec, arm): _group_key(spec, c) for arm in arms(spec) if (c := control_of(spec, arm))}
    out: dict[str, Any] = {}
    for key, m in means.items():
        entry: dict[str, Any] = {"values": {str(s): m[s] for s in sorted(m)}, **summarize(list(m.values())).as_dict()}
        if key in controls:
            entry["vs_control"] = _vs_control(controls[key], m, means[controls[key]], lower)
        out[key] = entry
    return out


def _trends(spec: ExperimentSpec, per_arm: dict[str, Any]) -> list[dict[str, Any]]:
    """How the paired difference changes along the x factor (the data-efficiency question: does the effect grow
    as the data shrinks?), per series of treated arms that differ only in their x level.

    Each x level's effect is compared with the effect at the largest x by a Welch interval (the runs at two sizes
    are independent, so seeds are not paired across them); the slope is a least-squares fit of every per-seed
    paired difference on x (or log10 x), with its t-interval at n − 2 df.
    """
    factor, ctrl = _x_factor(spec), control_factor(spec)
    if factor is None or ctrl is None:
        return []
    xf, pos = factor.name, _axis(factor)
    groups: dict[str, list[tuple[float, str, list[float]]]] = {}
    for arm in arms(spec):
        vs = per_arm[arm.name].get("vs_control")
        if vs is None:
            continue
        label = ", ".join(f"{f}={lv.name}" for f, lv in arm.levels if f != xf)
        x = float(arm.level(xf).x)  # type: ignore[arg-type]  # _x_factor checked every level has one
        groups.setdefault(label, []).append((x, arm.level(xf).name, list(vs["diffs"].values())))
    out = []
    for label, points in groups.items():
        points.sort()
        ref_x, ref_name, ref = points[-1]
        rows = []
        for x, name, diffs in points:
            row: dict[str, Any] = {"x": x, "level": name, "effect": summarize(diffs).as_dict()}
            if x != ref_x:
                row["minus_ref"] = welch(diffs, ref).as_dict()
            rows.append(row)
        xs = [pos(x) for x, _, diffs in points for _ in diffs]
        ys = [d for _, _, diffs in points for d in diffs]
        fit = slope(xs, ys).as_dict() if len(set(xs)) > 1 else None
        out.append({"series": label, "factor": xf, "ref": ref_name, "log_x": factor.log_x, "n": len(ys),
                    "points": rows, "slope": fit})  # fmt: skip
    return out


def _x_factor(spec: ExperimentSpec) -> Factor | None:
    """The factor whose levels all have an ``x`` (the plots' numeric axis), other than the control factor."""
    ctrl = control_factor(spec)
    for f in spec.factors:
        if (ctrl is None or f.name != ctrl.name) and all(lv.x is not None for lv in f.levels):
            return f
    return None


def _axis(factor: Factor) -> Any:
    """Where a level's x sits on the axis the trend is fitted and plotted on: log10 x for a ``log_x`` factor (10,
    25, 50, 100 % at even steps of the data's growth), else x."""
    return math.log10 if factor.log_x else float


def _plot_series(spec: ExperimentSpec, per_arm: dict[str, Any], diff: bool) -> tuple[dict[str, list[Point]], Any]:
    """Series and x tick labels: the x factor on the axis (numeric), else the arms grouped categorically."""
    factor = _x_factor(spec)
    xf = factor.name if factor else None
    ctrl = control_factor(spec)
    series: dict[str, list[Point]] = {}
    ticks: dict[float, str] | None = None
    others = [f for f in spec.factors if f.name != xf and (ctrl is None or f.name != ctrl.name or xf is None)]
    if xf is None:
        # categories: the combinations of the non-control factors; series: the control factor's levels
        groups = [f for f in spec.factors if ctrl is None or f.name != ctrl.name]
        combos = list(itertools.product(*[[lv.name for lv in f.levels] for f in groups])) or [()]
        ticks = {float(i): ",".join(c) or "all" for i, c in enumerate(combos)}
        for arm in arms(spec):
            key = tuple(arm.level(f.name).name for f in groups)
            label = arm.level(ctrl.name).name if ctrl else "mean"
            point = _point(per_arm[arm.name], diff)
            if point is not None:
                series.setdefault(label, []).append((float(combos.index(key)), *point))
        return series, ticks
    assert factor is not None
    pos = _axis(factor)
    if factor.log_x:  # the ticks keep the level names
        ticks = {pos(float(lv.x or 1.0)): lv.name for lv in factor.levels}
    for arm in arms(spec):
        label = ",".join(arm.level(f.name).name for f in others if f.name != xf) or "mean"
        if ctrl is not None and xf != ctrl.name:
            label = ",".join(filter(None, [label if label != "mean" else "", arm.level(ctrl.name).name]))
        point = _point(per_arm[arm.name], diff)
        if point is not None:
            series.setdefault(label, []).append((pos(float(arm.level(xf).x or 0.0)), *point))
    return series, ticks


def _point(entry: dict[str, Any], diff: bool) -> tuple[float, float] | None:
    src = entry.get("vs_control") if diff else entry
    if not src or not src["n"]:
        return None
    return src["mean"], src["ci95_half"]


def markdown(spec: ExperimentSpec, data: dict[str, Any], command: str = "") -> str:
    """The report as markdown (what ``README.md`` holds; :mod:`experiments.practice` reuses the tables)."""
    lines = [f"# Experiment `{spec.name}`", ""]
    if spec.claim:
        lines += [f"**Claim tested.** {spec.claim}", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    lines += [f"Seeds: {', '.join(map(str, spec.seeds))}. Interval: mean ± half-width of the two-sided 95 % Student-t "
              "interval over seeds (n runs). Paired differences: arm − control with the same seed.", ""]  # fmt: skip
    if command:
        lines += ["```bash", command, "```", ""]
    for metric in spec.metrics:
        if data.get("averaged"):
            lines += [averaged_table(spec, data, metric), ""]
        lines += [metric_table(spec, data, metric), ""]
        images = f"![{metric}]({_png(metric)})"
        if control_factor(spec) is not None:
            lines += [diff_table(spec, data, metric), ""]
        if data.get("averaged_comparisons"):
            lines += [comparison_table(data, metric, True, spec.average_over or ""), ""]
        if data.get("comparisons"):
            lines += [comparison_table(data, metric), ""]
            images += f" ![{metric} paired difference]({_png(metric, True)})"
        lines += [images, ""]
        for trend in data.get("trends", {}).get(metric, []):
            lines += [trend_table(trend, metric), ""]
    if data.get("curves"):
        lines += ["Training curves (mean over the seeds, bars: 95 % interval):", ""]
        if data.get("curves_carried"):
            names = ", ".join(a.label for a in arms(spec) if a.name in data["curves_carried"])
            lines += [f"The curves of {names} are the earlier report's (every run of them carried).", ""]
        lines += [" ".join(f"![{name}](curve_{_png(name)})" for name in data["curves"]), ""]
    if data.get("carried"):
        lines += ["Runs carried from an earlier report (their run folders are not here), by source:", ""]
        lines += [f"- {m}" for m in _carried_by_source(data["carried"])] + [""]
    if data["missing"]:
        lines += ["Runs not finished (left out of n):", ""] + [f"- {m}" for m in data["missing"]] + [""]
    if spec.gpu_recipe:
        lines += ["## At full size (GPU)", "", spec.gpu_recipe.strip(), ""]
    return "\n".join(lines)


def metric_table(spec: ExperimentSpec, data: dict[str, Any], metric: str) -> str:
    rows = [f"**{metric}**", "", "| arm | n | mean ± 95 % CI | interval | per seed |", "|---|---|---|---|---|"]
    for arm in arms(spec):
        e = data["metrics"][metric].get(arm.name)
        if e is None:  # an arm the recipe gained after this report was written
            continue
        s = Summary(e["n"], e["mean"], e["sd"], e["ci95_half"])
        rows.append(
            f"| {arm.label} | {e['n']} | {_pm(s)} | {_ci(s)} | {_seeds({int(k): v for k, v in e['values'].items()})} |"
        )
    return "\n".join(rows)


def averaged_table(spec: ExperimentSpec, data: dict[str, Any], metric: str) -> str:
    """The ``average_over`` summary: each group's per-seed mean over that factor's levels, and its paired
    difference with the control group."""
    rows = [
        f"**{metric}: mean over {spec.average_over}** (per seed, only seeds with every {spec.average_over} level)",
        "",
        "| arms | n | mean ± 95 % CI | per seed | paired diff vs control | interval | seeds better |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, e in data["averaged"][metric].items():
        s = Summary(e["n"], e["mean"], e["sd"], e["ci95_half"])
        vals = _seeds({int(k): v for k, v in e["values"].items()})
        vs = e.get("vs_control")
        if vs is None:
            cells = "– | – | –"
        else:
            d = Summary(vs["n"], vs["mean"], vs["sd"], vs["ci95_half"])
            sign = f"**{d.mean:+.2f} ± {d.half:.2f}**" if d.excludes_zero() else _pm_signed(d)
            cells = f"{sign} | {_ci(d)} | {vs['better']}/{vs['n']}"
        rows.append(f"| {key} | {e['n']} | {_pm(s)} | {vals} | {cells} |")
    return "\n".join(rows)


def _pm_signed(s: Summary) -> str:
    if s.n == 0:
        return "—"
    return f"{s.mean:+.2f} ± {s.half:.2f}" if s.n >= 2 else f"{s.mean:+.2f} (n=1)"


def diff_table(spec: ExperimentSpec, data: dict[str, Any], metric: str) -> str:
    ctrl = control_factor(spec)
    assert ctrl is not None
    rows = [
        f"**{metric}: paired difference vs {ctrl.name}={ctrl.control}**",
        "",
        "| arm | n | mean diff ± 95 % CI | interval | seeds better | per seed |",
        "|---|---|---|---|---|---|",
    ]
    for arm in arms(spec):
        e = data["metrics"][metric].get(arm.name, {}).get("vs_control")
        if e is None:
            continue
        s = Summary(e["n"], e["mean"], e["sd"], e["ci95_half"])
        diffs = {int(k): v for k, v in e["diffs"].items()}
        sign = _pm_signed(s)
        rows.append(f"| {arm.label} | {e['n']} | {sign} | {_ci(s)} | {e['better']}/{e['n']} | {_seeds(diffs, True)} |")
    return "\n".join(rows)


def comparison_entries(data: dict[str, Any], metric: str, averaged: bool = False) -> list[tuple[str, str, dict]]:
    """(label, vs label, entry) of each of the recipe's ``comparisons`` (per averaged group with ``averaged``)."""
    labels = {a["name"]: a["label"] for a in data["arms"]}
    got = data.get("averaged_comparisons" if averaged else "comparisons", {}).get(metric, [])
    return [(labels.get(e["arm"], e["arm"]), labels.get(e["vs"], e["vs"]), e) for e in got]


def comparison_table(data: dict[str, Any], metric: str, averaged: bool = False, over: str = "") -> str:
    """The paired differences between treated arms the recipe asked for (``comparisons``), as a table."""
    what = f", mean over {over}" if averaged else ""
    rows = [f"**{metric}: paired comparisons between arms{what}**", "",
            "| arm | vs | n | mean diff ± 95 % CI | interval | seeds better | per seed |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, vs, e in comparison_entries(data, metric, averaged):
        s = Summary(e["n"], e["mean"], e["sd"], e["ci95_half"])
        diffs = {int(k): v for k, v in e["diffs"].items()}
        rows.append(f"| {label} | {vs} | {e['n']} | {_pm_signed(s)} | {_ci(s)} | {e['better']}/{e['n']} | "
                    f"{_seeds(diffs, True)} |")  # fmt: skip
    return "\n".join(rows)


def trend_table(trend: dict[str, Any], metric: str) -> str:
    """The effect at each x level, its difference from the effect at the largest x, and the fitted slope."""
    xf, ref = trend["factor"], trend["ref"]
    rows = [
        f"**{metric}: how the paired difference changes with {xf}** ({trend['series']})",
        "",
        f"| {xf} | n | effect ± 95 % CI | effect − effect at {xf}={ref} (Welch) | interval | df |",
        "|---|---|---|---|---|---|",
    ]
    for p in trend["points"]:
        e = p["effect"]
        eff = f"{e['mean']:+.2f} ± {e['ci95_half']:.2f}" if e["n"] >= 2 else (f"{e['mean']:+.2f}" if e["n"] else "—")
        w = p.get("minus_ref")
        if w is None:
            cells = "reference | — | —"
        elif math.isfinite(w["ci95_half"]):
            lo, hi = w["ci95"]
            cells = f"{w['estimate']:+.2f} ± {w['ci95_half']:.2f} | [{lo:.2f}, {hi:.2f}] | {w['df']:.1f}"
        else:
            cells = "— (needs n ≥ 2 at both) | — | —"
        rows.append(f"| {p['level']} | {e['n']} | {eff} | {cells} |")
    fit = trend["slope"]
    if fit is not None and math.isfinite(fit["ci95_half"]):
        per = f"per unit of log10 {xf} (a tenfold {xf})" if trend["log_x"] else f"per unit of {xf}"
        rows += ["", f"Slope of the per-seed paired difference on {'log10 ' if trend['log_x'] else ''}{xf}: "
                 f"**{fit['estimate']:+.2f} ± {fit['ci95_half']:.2f}** {per} (least squares over n = {trend['n']} "
                 f"runs, t-interval at {fit['df']:.0f} df); negative: the effect grows as {xf} shrinks."]  # fmt: skip
    return "\n".join(rows)


def curves(spec: ExperimentSpec) -> dict[str, dict[str, list[dict[str, float]]]]:
    """``{curve name: {arm: [{step, mean, half, n}]}}``: each curve's mean over the seeds at the steps every
    finished seed logged (a run still going, or one that logged fewer steps, would bias the mean)."""
    out: dict[str, dict[str, list[dict[str, float]]]] = {}
    for c in spec.curves:
        per_arm = out.setdefault(f"{c.stage}.{c.key}", {})
        for arm in arms(spec):
            by_seed = []
            for seed in spec.seeds:
                path = run_dir(spec, arm, seed) / c.stage / c.file
                if not path.is_file():
                    continue
                rows = {}
                for line in path.read_text().splitlines():
                    try:
                        row = json.loads(line)
                        rows[int(row["step"])] = float(row[c.key])
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line of a killed run, or a row without this key
                if rows:
                    by_seed.append(rows)
            steps = sorted(set.intersection(*(set(r) for r in by_seed))) if by_seed else []
            points = []
            for step in steps:
                s = summarize([r[step] for r in by_seed])
                points.append({"step": step, "mean": s.mean, "half": s.half, "n": s.n})
            per_arm[arm.name] = points
    return out


def _carry_curves(
    spec: ExperimentSpec, got: dict[str, dict[str, list[dict[str, float]]]], carry: Path, fingerprints: dict[str, str]
) -> list[str]:
    """Fill in, from the earlier report, the curves of each arm whose every seed is carried (no folder left to
    read them from); returns those arms' names."""
    earlier, keys = _earlier_report(spec, carry), carried_runs(spec, carry, fingerprints)
    filled = []
    for arm in arms(spec):
        if not all((arm.name, seed) in keys for seed in spec.seeds):
            continue
        for name, per_arm in got.items():
            old = earlier.get("curves", {}).get(name, {}).get(arm.name)
            if not per_arm.get(arm.name) and old:
                per_arm[arm.name] = old
                filled.append(arm.name)
    return sorted(set(filled))


def _png(metric: str, diff: bool = False) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", metric) + ("_diff" if diff else "") + ".png"


def write(spec: ExperimentSpec, command: str = "", carry: Path | None = None) -> Path:
    """Write the report folder ``<results>/<name>/``; returns it."""
    data = build(spec, carry)
    out = Path(spec.results) / spec.name
    out.mkdir(parents=True, exist_ok=True)
    factor = _x_factor(spec)
    if factor is not None:
        xlabel = f"{factor.name} (log scale)" if factor.log_x else factor.name
    else:
        xlabel = ", ".join(f.name for f in spec.factors if f is not control_factor(spec))
    for metric in spec.metrics:
        series, ticks = _plot_series(spec, data["metrics"][metric], diff=False)
        errorbar_plot(series, out / _png(metric), f"{spec.name}: {metric}", metric, xlabel, ticks)
        if control_factor(spec) is not None:
            series, ticks = _plot_series(spec, data["metrics"][metric], diff=True)
            ctrl = control_factor(spec)
            errorbar_plot(series, out / _png(metric, True), f"{spec.name}: {metric}, paired diff vs {ctrl.control}",
                          f"{metric} - control", xlabel, ticks, zero_line=True)  # fmt: skip
    if spec.curves:
        data["curves"] = curves(spec)
        if carry is not None:
            data["curves_carried"] = _carry_curves(spec, data["curves"], carry, data["fingerprints"])
        labels = {a.name: a.label for a in arms(spec)}
        for name, per_arm in data["curves"].items():
            series = {labels[a]: [(p["step"], p["mean"], p["half"]) for p in pts] for a, pts in per_arm.items()}
            errorbar_plot(series, out / ("curve_" + _png(name)), f"{spec.name}: {name} (mean over seeds)", name,
                          "step")  # fmt: skip
    data["generated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    data["commit"] = _commit()
    data["runs"] = {a.name: {str(s): str(run_dir(spec, a, s)) for s in spec.seeds} for a in arms(spec)}
    (out / "results.json").write_text(json.dumps(data, indent=1, allow_nan=True) + "\n")
    (out / "README.md").write_text(markdown(spec, data, command))
    return out
