"""The study's report: docs/benchmark.md, docs/benchmark.json and three PNGs, from `benchmark.collect`'s numbers.

Every number in the report is recomputed from the JSON written beside it (`write_report(cfg, results)`
with `results = json.load(open("docs/benchmark.json"))` gives the same report). Plots are drawn with OpenCV,
which kdcache already needs, so the study adds no plotting dependency.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from report_plot import GREY, PALETTE, Plot, nice_ticks, y_range

# Per-crop costs measured on this project's 2-core CPU at 256x192 (README "Training speed": scripts/bench_train.py,
# mobilenetv3_large_100, batch 16, at 80494fa; README "Teacher speed": scripts/bench_teacher.py). Milliseconds.
MEASURED_MS = {
    "cached_step": 1e3 / 15.6,          # train-student from a cache: loading + student step
    "teacher": {"ViTPose-B": 217.0,     # forward per crop, the online run's extra cost (bench_train)
                "ViTPose-H": 1e3 / 0.637},  # forward per crop (bench_teacher, full model with head)
    "dump_ratio": 0.97,                 # dump views/s over forward views/s (README "Write ratio", ViTPose-S)
}
COCO_INSTANCES = 149_813               # person instances ViTPose trains on (COCO train2017)
COCO_EPOCHS = 210                      # ViTPose's schedule


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def diff_se(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """mean(a) - mean(b) and its standard error (Welch: sqrt(s_a^2 / n_a + s_b^2 / n_b))."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    return ma - mb, math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))


def beyond_noise(a: Sequence[float], b: Sequence[float]) -> bool:
    """A difference of means is called real when it exceeds twice its standard error."""
    d, se = diff_se(a, b)
    return abs(d) > 2 * se and len(a) > 1 and len(b) > 1


def by_arm(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    arms: dict[str, list[dict[str, Any]]] = {}
    for run in results["runs"]:
        arms.setdefault(run["name"], []).append(run)
    return arms


def aps(runs: list[dict[str, Any]]) -> list[float]:
    return [r["AP"] for r in runs]


def fmt(values: Sequence[float], digits: int = 1) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def fmt_diff(a: Sequence[float], b: Sequence[float]) -> str:
    """Difference of means ± its standard error, * beyond noise; a side with one seed has no noise estimate."""
    d, se = diff_se(a, b)
    if min(len(a), len(b)) < 2:
        return f"{d:+.1f} (one seed)"
    mark = " *" if beyond_noise(a, b) else ""
    return f"{d:+.1f} ± {se:.1f}{mark}"


# ---- the report ------------------------------------------------------------------------------------------

def recommended_fraction(cfg: Any, arms: dict[str, list[dict[str, Any]]], suffix: str = "") -> float:
    """The smallest K / E whose cached students (arm `cache-kK<suffix>`) are not below K = E beyond noise:
    what fewer views cost, measured against the cache's own best (the cache-vs-online gap is separate)."""
    full = aps(arms[f"cache-k{max(cfg.train_views)}"])
    ok = [k for k in cfg.train_views if f"cache-k{k}{suffix}" in arms
          and not (mean_std(aps(arms[f"cache-k{k}{suffix}"]))[0] < mean_std(full)[0]
                   and beyond_noise(aps(arms[f"cache-k{k}{suffix}"]), full))]
    return min(ok, default=max(cfg.train_views)) / cfg.epochs


def cumulative(results: dict[str, Any], arms: dict[str, list[dict[str, Any]]], k_full: int,
               counts: Sequence[int] = (1, 3, 10)) -> list[dict[str, float]]:
    """Wall time of training N students: one dump + N cached runs, against N online runs (seconds)."""
    dump_s = results["dumps"]["cache"]["seconds"]
    cached = mean_std([r["train_seconds"] for r in arms[f"cache-k{k_full}"]])[0]
    online = mean_std([r["train_seconds"] for r in arms["online"]])[0]
    gt = mean_std([r["train_seconds"] for r in arms["gt"]])[0]
    return [{"N": n, "cached": dump_s + n * cached, "online": n * online, "gt": n * gt} for n in counts]


def projection(views: int, counts: Sequence[int] = (1, 3, 10)) -> list[dict[str, Any]]:
    """Hours on this CPU for N students of COCO_EPOCHS epochs over COCO's instances, from MEASURED_MS."""
    step = MEASURED_MS["cached_step"]
    rows = []
    for teacher, t in MEASURED_MS["teacher"].items():
        dump_h = views * COCO_INSTANCES * t / MEASURED_MS["dump_ratio"] / 3.6e6
        run_h = COCO_EPOCHS * COCO_INSTANCES * step / 3.6e6
        online_h = COCO_EPOCHS * COCO_INSTANCES * (step + t) / 3.6e6
        for n in counts:
            rows.append({"teacher": teacher, "N": n, "cached_h": dump_h + n * run_h, "online_h": n * online_h,
                         "dump_h": dump_h})
    return rows


def write_report(cfg: Any, results: dict[str, Any]) -> None:
    report = Path(cfg.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    arms = by_arm(results)
    have = set(arms)
    needed = {"gt", "online", *(f"cache-k{k}" for k in cfg.train_views)}
    if not needed <= have:
        report.write_text(f"# Benchmark (partial)\n\nRuns finished so far: {len(results['runs'])}; the report "
                          f"needs at least one seed of {sorted(needed - have)}.\n")
        return
    lines = _text(cfg, results, arms, report)
    report.write_text("\n".join(lines) + "\n")


def _plots(cfg: Any, results: dict[str, Any], arms: dict[str, list[dict[str, Any]]], report: Path,
           cum: list[dict[str, float]]) -> dict[str, str]:
    k_full = max(cfg.train_views)
    names = {}
    # 1. AP against training views K
    all_ap = [r["AP"] for r in results["runs"]]
    plot = Plot((min(cfg.train_views) / 1.6, max(cfg.train_views) * 1.6), y_range(all_ap),
                "training views K in the cache (log scale)", "student AP",
                f"{cfg.student}, {cfg.epochs} epochs: AP against cached views (mean +- std over seeds)", log2_x=True)
    y0, y1 = plot.y0, plot.y1
    plot.ticks(sorted(cfg.train_views), nice_ticks(y0, y1))
    plot.band(*mean_std(aps(arms["online"])), PALETTE[1], "teacher online (fresh view every epoch)")
    plot.band(*mean_std(aps(arms["gt"])), GREY, "ground truth only")
    plot.series([(k, *mean_std(aps(arms[f"cache-k{k}"]))) for k in sorted(cfg.train_views)], PALETTE[0],
                "cache, random mirror (default)")
    variants = [("nomirror", "no train-time mirror", 2 ** -0.25, PALETTE[5]),
                ("jitter", "mirror + jitter", 2 ** 0.2, PALETTE[3]),
                ("photo", "mirror + jitter + photometric", 2 ** 0.4, PALETTE[4])]
    for suffix, label, dx, colour in variants:
        points = [(k * dx, *mean_std(aps(arms[f"cache-k{k}-{suffix}"]))) for k in sorted(cfg.train_views)
                  if f"cache-k{k}-{suffix}" in arms]
        if points:
            plot.series(points, colour, label, line=False)
    names["views"] = report.with_name(report.stem + "_views.png")
    plot.save(names["views"])
    # 2. AP against cumulative wall time for N students
    xs = [row[a] / 60 for row in cum for a in ("cached", "online", "gt")]
    plot = Plot((0, max(xs) * 1.08), y_range([mean_std(aps(arms[a]))[0] for a in ("gt", "online",
                                                                                   f"cache-k{k_full}")]),
                "cumulative training wall time (min), N students", "student AP (mean)",
                "AP against the wall time of training N = 1, 3, 10 students")
    plot.ticks(nice_ticks(0, max(xs) * 1.08), nice_ticks(plot.y0, plot.y1))
    for arm, key, colour, label in ((f"cache-k{k_full}", "cached", PALETTE[0], "one dump + N cached runs"),
                                    ("online", "online", PALETTE[1], "N online runs"),
                                    ("gt", "gt", GREY, "N ground-truth runs (no teacher)")):
        m = mean_std(aps(arms[arm]))[0]
        plot.series([(row[key] / 60, m, 0.0) for row in cum], colour, label)
        for row in cum:
            plot.label(row[key] / 60, m, f"N={row['N']}", colour)
    names["cost"] = report.with_name(report.stem + "_cost.png")
    plot.save(names["cost"], corner="top-left")
    # 3. AP against bytes per view
    storage = [(f"cache-k{cfg.storage_views}-float16", "cache-float16"), (f"cache-k{cfg.storage_views}", "cache"),
               (f"cache-k{cfg.storage_views}-eps03", "cache-eps03")]
    storage = [(a, c) for a, c in storage if a in arms and c in results["dumps"]]
    if len(storage) > 1:
        kb = [results["dumps"][c]["kb_per_view"] for _, c in storage]
        plot = Plot((0, max(kb) * 1.15), y_range([r["AP"] for a, _ in storage for r in arms[a]]),
                    "cache KB per view", "student AP",
                    f"K = {cfg.storage_views}: AP against heatmap storage (mean +- std over seeds)")
        plot.ticks(nice_ticks(0, max(kb) * 1.15), nice_ticks(plot.y0, plot.y1))
        for (arm, cache), x, colour in zip(storage, kb, PALETTE):
            plot.series([(x, *mean_std(aps(arms[arm])))], colour, arms[arm][0]["storage"], line=False)
        names["storage"] = report.with_name(report.stem + "_storage.png")
        plot.save(names["storage"])
    return {k: v.name for k, v in names.items()}


def _text(cfg: Any, results: dict[str, Any], arms: dict[str, list[dict[str, Any]]], report: Path) -> list[str]:
    small, k_full, E = min(cfg.train_views), max(cfg.train_views), cfg.epochs
    teacher = results["teacher"]
    gt, online, full = aps(arms["gt"]), aps(arms["online"]), aps(arms[f"cache-k{k_full}"])
    cum = cumulative(results, arms, k_full)
    plots = _plots(cfg, results, arms, report, cum)
    seeds = sorted({r["seed"] for r in results["runs"]})
    dumps = results["dumps"]
    main = dumps["cache"]
    gap = teacher["AP"] - max(gt)
    lines = [
        "# Benchmark: does the cache keep online distillation's accuracy, and how many views does a run need?",
        "",
        f"Made by `python scripts/benchmark.py` (resumable: every stage and every training run continues where it "
        f"was killed); the numbers behind every table are in [`{report.stem}.json`]({report.stem}.json). Wall time "
        f"of the whole study on this project's 2-core CPU: {results['study_seconds'] / 3600:.1f} h of compute "
        "(stage times summed over its sittings).",
        "",
        "## Regime",
        "",
        f"- **Data**: `kdcache synth`, {cfg.train_images} training images with {cfg.max_people} person each "
        f"(so {cfg.train_images} instances), clutter {cfg.clutter}; {cfg.val_images} validation images. Crops "
        f"{cfg.input_hw[0]}×{cfg.input_hw[1]} (a quarter of ViTPose's pixels, for the CPU), heatmaps "
        f"{cfg.input_hw[0] // 4}×{cfg.input_hw[1] // 4}, σ 2, UDP. View augmentation: flip 0.5, scale, center "
        "shift (no rotation or half-body: the demo's CPU recipe, `kdcache.demo.DEMO_AUG`).",
        f"- **Teacher**: `{teacher['arch']}` (ViTPose, 192 wide, 6 blocks) trained {teacher['epochs']} epochs on "
        f"ground truth, AdamW lr 1e-3, cosine to zero: **{teacher['AP']:.1f} AP** on the validation split "
        f"(by epoch: {', '.join(f'{e}: {ap:.1f}' for e, ap in teacher['val_curve'])}). Its training took "
        f"{teacher['train_seconds'] / 60:.0f} min and is not counted in any arm (users start from a released "
        "teacher).",
        f"- **Student**: `{cfg.student}` with a deconvolution head of {cfg.student_head_channels} channels, from "
        f"scratch, **{E} epochs** in every arm (an epoch is one view of every instance), batch {cfg.batch_size}, "
        f"AdamW lr {cfg.lr:g}, 100 warm-up steps, cosine to zero; KD loss α = {cfg.alpha} × teacher MSE + "
        f"(1 − α) × ground-truth MSE. Seeds {', '.join(map(str, seeds))} per arm (the seed sets the initial "
        "weights, the data order, the train-time mirror and, for online and ground-truth runs, the views).",
        f"- **Cache**: dumped once with {main['views'] - 1} training views per instance (+ view 0), seed 0, "
        f"`int16-step` 0.8 %, JPEG 90 crops: {main['seconds']:.0f} s for {main['views_total']} views, "
        f"{main['kb_per_view']:.1f} KB per view. `--train-views K` restricts a run to views 1..K: epoch e reads "
        f"view 1 + e mod K, so K = {k_full} shows each view once and K = {small} replays one view {E // small} times.",
        f"- **AP**: COCO keypoint AP (pycocotools) on the {cfg.val_images} validation people, ground-truth boxes, "
        "no flip test, weights after the last epoch. Mean ± sample std over seeds; a difference is marked * when it "
        "exceeds twice its standard error (Welch), i.e. beyond seed noise.",
        f"- **Teacher gap** (goal ≥ 8 AP above the best ground-truth-only student): {teacher['AP']:.1f} − "
        f"{max(gt):.1f} = **{gap:.1f} AP** ({'met' if gap >= 8 else 'not met'}). Made by both levers: the teacher "
        f"trains {teacher['epochs'] // E}× the students' epochs, and the student is a 0.5-width MobileNetV3-Small.",
        "",
        "## All arms",
        "",
        "| arm | training views K | replays per view | train-time variety | heatmaps stored as | KB/view | AP | AP50 "
        "| AP vs online | training s |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, runs in arms.items():
        r0 = runs[0]
        k = r0["train_views"]
        kb = dumps.get(r0.get("cache") or "", {}).get("kb_per_view")
        versus = "" if name == "online" else fmt_diff(aps(runs), online)
        lines.append(
            f"| {name} | {k if k else '–'} | {f'{E / k:g}' if k else '–'} | {r0['variety']} "
            f"| {r0['storage'] or '–'} | {f'{kb:.1f}' if kb else '–'} | {fmt(aps(runs))} (n={len(runs)}) "
            f"| {fmt([r['AP50'] for r in runs])} | {versus} "
            f"| {mean_std([r['train_seconds'] for r in runs])[0]:.0f} |")
    lines += ["", f"![AP against cached views]({plots['views']})", ""]

    # View reuse
    kd_gain_online = diff_se(online, gt)
    lines += [
        "## View reuse",
        "",
        f"- **KD helps**: online {fmt(online)} vs ground truth only {fmt(gt)} AP ({fmt_diff(online, gt)}); "
        f"cache K = {k_full} vs ground truth {fmt_diff(full, gt)}.",
    ]
    for k in sorted(cfg.train_views, reverse=True):
        runs = aps(arms[f"cache-k{k}"])
        lines.append(f"- **K = {k}** ({E // k} replay{'s' if E // k > 1 else ''} per view): {fmt(runs)} AP; "
                     f"vs online {fmt_diff(runs, online)}; vs K = {k_full} {fmt_diff(runs, full)}; share of the KD "
                     f"gain kept: {_share(runs, online, gt)}.")
    if teacher.get("AP_on_training_set") is not None and kd_gain_online[0] < 2 * max(kd_gain_online[1], 0.5):
        lines.append(f"- **Why KD adds little here**: the teacher scores {teacher['AP_on_training_set']:.1f} AP on "
                     f"its own {cfg.train_images} training people (against {teacher['AP']:.1f} on validation): it "
                     "was trained on the very people the students learn from, so on their views its maps say "
                     "little that the ground truth does not. Distillation pays where the teacher knows more "
                     "than the labels: on people nobody annotated ([benchmark_unlabelled.md](benchmark_unlabelled.md) "
                     "measures it) and with students that can use it."
                     + (f" The ground-truth student (seed {seeds[0]}) scores {results['gt_student_AP_on_training_set']:.1f}"
                        f" AP on its training people, as on validation: it underfits, limited by its size and "
                        f"{E} epochs rather than by its targets." if results.get("gt_student_AP_on_training_set")
                        is not None else ""))
    lines.append("")

    # Variety at the smallest K
    base = aps(arms[f"cache-k{small}"])
    lines += [f"## What recovers view reuse (K = {small}, each view replayed {E // small} times)", "",
              "| train-time variety | AP | vs mirror only (the default) | vs online |", "|---|---:|---:|---:|"]
    for name, label in ((f"cache-k{small}-nomirror", "none (no mirror)"), (f"cache-k{small}", "random mirror"),
                        (f"cache-k{small}-jitter", "mirror + jitter 0.5"),
                        (f"cache-k{small}-photo", "mirror + jitter 0.5 + photometric/occlusion")):
        if name in arms:
            runs = aps(arms[name])
            lines.append(f"| {label} | {fmt(runs)} | {'' if name == f'cache-k{small}' else fmt_diff(runs, base)} "
                         f"| {fmt_diff(runs, online)} |")
    mid = f"cache-k{cfg.storage_views}-jitter"
    if mid in arms:
        runs, mid_base = aps(arms[mid]), aps(arms[f"cache-k{cfg.storage_views}"])
        lines += ["", f"At K = {cfg.storage_views} ({E // cfg.storage_views} replays per view): mirror + jitter 0.5 "
                  f"{fmt(runs)} AP, {fmt_diff(runs, mid_base)} against mirror only, {fmt_diff(runs, online)} against "
                  "online."]
    lines += ["", "Photometric set: colour 0.5, blur 0.2, noise 0.2, grayscale 0.1, occlusion 0.3 (student's "
              "pixels only; the cached target stays). Jitter: ±10°, ×(1 ± 0.1), ±5 % shift of crop and teacher "
              "heatmaps together.", ""]

    # Storage
    lines += [f"## What storage precision costs (K = {cfg.storage_views})", "",
              "| heatmaps stored as | KB per view (heatmaps) | AP | vs int16-step 0.8 % (the default when the study ran) |",
              "|---|---:|---:|---:|"]
    default = aps(arms[f"cache-k{cfg.storage_views}"])
    for name, cache in ((f"cache-k{cfg.storage_views}-float16", "cache-float16"),
                        (f"cache-k{cfg.storage_views}", "cache"), (f"cache-k{cfg.storage_views}-eps03", "cache-eps03")):
        if name in arms and cache in dumps:
            runs = aps(arms[name])
            d = dumps[cache]
            lines.append(f"| {arms[name][0]['storage']} | {d['kb_per_view']:.1f} ({d['kb_per_view_parts']['heatmaps']:.1f}) "
                         f"| {fmt(runs)} | {'' if cache == 'cache' else fmt_diff(runs, default)} |")
    if "storage" in plots:
        lines += ["", f"![AP against bytes per view]({plots['storage']})"]
    lines.append("")

    # Diagnostics: what separates a cached run from an online one
    nomirror, png = f"cache-k{k_full}-nomirror", f"cache-k{cfg.storage_views}-png"
    if nomirror in arms or png in arms:
        lines += ["## Where a cached run differs from an online one", "",
                  f"A cached run at K = {k_full} sees the views an online run of seed 0 sees, with three differences: "
                  "the crops went through JPEG 90, the heatmaps through 0.8 % quantisation, and each view is "
                  "mirrored again at random at train time. Storage precision is measured above; these arms take "
                  "away the other two.", "",
                  "| arm | AP | vs its default | vs online |", "|---|---:|---:|---:|"]
        for name, base_name in ((nomirror, f"cache-k{k_full}"), (png, f"cache-k{cfg.storage_views}")):
            if name in arms:
                runs = aps(arms[name])
                lines.append(f"| {name} | {fmt(runs)} | {fmt_diff(runs, aps(arms[base_name]))} ({base_name}) "
                             f"| {fmt_diff(runs, online)} |")
        same = "online-dumpviews"
        if same in arms:
            lines.append(f"| {same} (online on the cache's views) | {fmt(aps(arms[same]))} | | "
                         f"{fmt_diff(aps(arms[same]), online)} |")
        lines.append("")
        if same in arms and nomirror in arms:
            paired = {r["seed"]: r["AP"] for r in arms[nomirror]}
            diffs = [paired[r["seed"]] - r["AP"] for r in arms[same] if r["seed"] in paired]
            if diffs:
                m, sd = mean_std(diffs)
                se = sd / math.sqrt(len(diffs))
                lines.append(
                    f"**Paired, storage alone**: `{nomirror}` against `{same}`, seed by seed (same views, initial "
                    f"weights and data order; only JPEG crops and quantised heatmaps differ): "
                    f"{', '.join(f'{d:+.1f}' for d in diffs)} AP, mean {m:+.1f} ± {se:.1f} (standard error of the "
                    f"mean difference){' — beyond noise' if len(diffs) > 1 and abs(m) > 2 * se else ', within noise'}.")
                twin = {r["seed"]: r["AP"] for r in arms["online"]}
                if seeds[0] in twin and seeds[0] in {r["seed"] for r in arms[same]}:
                    again = [r["AP"] for r in arms[same] if r["seed"] == seeds[0]][0]
                    lines.append(f"Seed {seeds[0]} of `{same}` is the same run as seed {seeds[0]} of `online` "
                                 f"(its views are its own seed's): {again:.2f} against {twin[seeds[0]]:.2f} AP.")
                lines.append("")

    # Cost
    per_arm = {name: mean_std([r["train_seconds"] for r in runs])[0] for name, runs in arms.items()}
    crops = E * cfg.train_images * cfg.max_people
    others = ", ".join(f"{n}: {d['seconds']:.0f} s" for n, d in dumps.items() if n != "cache")
    lines += ["## Cost", "",
              f"Dump: {main['seconds']:.0f} s for {main['views_total']} views ({1e3 * main['seconds'] / main['views_total']:.1f} ms "
              f"per view, teacher forward, crop JPEG and heatmap encoding included); the storage caches "
              f"{others}. Training, mean over "
              f"seeds: ground truth {per_arm['gt']:.0f} s, online {per_arm['online']:.0f} s, cached "
              f"{per_arm[f'cache-k{k_full}']:.0f} s ({1e3 * per_arm[f'cache-k{k_full}'] / crops:.1f} ms per crop against "
              f"{1e3 * per_arm['online'] / crops:.1f} online). The machine was shared with development work during "
              "parts of the study, so single timings carry a few percent of noise; the means are over all seeds.", "",
              "| students N | one dump + N cached runs | N online runs | online / cached | N ground-truth runs |",
              "|---:|---:|---:|---:|---:|"]
    for row in cum:
        lines.append(f"| {row['N']} | {row['cached'] / 60:.1f} min | {row['online'] / 60:.1f} min "
                     f"| {row['online'] / row['cached']:.2f}× | {row['gt'] / 60:.1f} min |")
    fraction = recommended_fraction(cfg, arms)
    with_jitter = min(fraction, recommended_fraction(cfg, arms, "-jitter"))
    plans = sorted({math.ceil(COCO_EPOCHS * f) + 1 for f in (fraction, with_jitter)})
    lines += ["", f"![AP against cumulative wall time]({plots['cost']})", "",
              f"**Projected for released teachers** (COCO: {COCO_INSTANCES:,} instances, {COCO_EPOCHS} epochs; "
              f"`--views` {' or '.join(map(str, plans))}: K/E = {fraction:g} with the mirror alone"
              + (f", {with_jitter:g} with jitter" if with_jitter < fraction else "") + ", as advised below), from the "
              f"per-crop costs `scripts/bench_train.py` and `scripts/bench_teacher.py` measured on this CPU at "
              f"256×192 (cached step {MEASURED_MS['cached_step']:.0f} ms per crop for mobilenetv3_large_100; teacher "
              f"forward {', '.join(f'{t} {ms:.0f} ms' for t, ms in MEASURED_MS['teacher'].items())}; dump at "
              f"{MEASURED_MS['dump_ratio']} of the teacher's forward rate). Hours on this CPU; a GPU divides both "
              "columns alike when the teacher dominates.", "",
              "| teacher | `--views` | students N | dump | one dump + N cached runs | N online runs | online / cached |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for views in plans:
        for row in projection(views):
            lines.append(f"| {row['teacher']} | {views} | {row['N']} | {row['dump_h']:,.0f} h | {row['cached_h']:,.0f} h "
                         f"| {row['online_h']:,.0f} h | {row['online_h'] / row['cached_h']:.1f}× |")
    lines += ["", *_advice(cfg, results, arms, fraction, with_jitter), ""]
    return lines


def _share(runs: Sequence[float], online: Sequence[float], gt: Sequence[float]) -> str:
    gain = mean_std(online)[0] - mean_std(gt)[0]
    if gain <= 0:
        return "– (no KD gain online)"
    return f"{100 * (mean_std(runs)[0] - mean_std(gt)[0]) / gain:.0f} %"


def _advice(cfg: Any, results: dict[str, Any], arms: dict[str, list[dict[str, Any]]], fraction: float,
            with_jitter: float) -> list[str]:
    small, E, k_full = min(cfg.train_views), cfg.epochs, max(cfg.train_views)
    base = aps(arms[f"cache-k{small}"])
    online, gt, full = aps(arms["online"]), aps(arms["gt"]), aps(arms[f"cache-k{k_full}"])
    lines = ["## Conclusions", ""]
    d, se = diff_se(online, gt)
    lines.append(f"- **KD over ground truth** (online): {d:+.1f} ± {se:.1f} AP"
                 f"{' (beyond noise)' if beyond_noise(online, gt) else ' (within noise)'}.")
    d, se = diff_se(full, online)
    lines.append(f"- **Cache against online** at K = {k_full} (no view replayed): {d:+.1f} ± {se:.1f} AP"
                 f"{' (beyond noise)' if beyond_noise(full, online) else ' (within noise)'}; see \"Where a cached "
                 "run differs\" for what it is made of.")
    lines.append(f"- **Views to dump**: with the train-time mirror alone, the smallest K not below K = {k_full} "
                 f"beyond seed noise is K = {round(fraction * E)} for {E} epochs (K/E = {fraction:g})"
                 + (f"; with jitter, K = {round(with_jitter * E)} (K/E = {with_jitter:g})" if with_jitter < fraction
                    else "") +
                 f". For ViTPose's 210 epochs: `--views {math.ceil(210 * fraction) + 1}`"
                 + (f", or `--views {math.ceil(210 * with_jitter) + 1}` with jitter" if with_jitter < fraction
                    else "") + ".")
    for name, label in ((f"cache-k{small}-jitter", "jitter"), (f"cache-k{small}-photo", "jitter + photometric")):
        if name in arms:
            runs = aps(arms[name])
            d, se = diff_se(runs, base)
            verdict = ("helps" if d > 0 else "hurts") if beyond_noise(runs, base) else "makes no difference beyond noise"
            lines.append(f"- **{label.capitalize()}** at K = {small}: {d:+.1f} ± {se:.1f} AP against mirror only: "
                         f"{verdict}.")
    if f"cache-k{small}-nomirror" in arms:
        runs = aps(arms[f"cache-k{small}-nomirror"])
        d, se = diff_se(base, runs)
        lines.append(f"- **Train-time mirror** at K = {small}: {d:+.1f} ± {se:.1f} AP over none"
                     f"{' (beyond noise)' if beyond_noise(base, runs) else ' (within noise)'}.")
    default = aps(arms[f"cache-k{cfg.storage_views}"])
    for name, label, cache in ((f"cache-k{cfg.storage_views}-eps03", "int16-step 3 %", "cache-eps03"),
                               (f"cache-k{cfg.storage_views}-float16", "float16", "cache-float16")):
        if name in arms and cache in results["dumps"]:
            runs = aps(arms[name])
            d, se = diff_se(runs, default)
            kb, kb0 = results["dumps"][cache]["kb_per_view"], results["dumps"]["cache"]["kb_per_view"]
            lines.append(f"- **Storage {label}**: {kb:.1f} against {kb0:.1f} KB per view, {d:+.1f} ± {se:.1f} AP "
                         f"against 0.8 %: {'beyond' if beyond_noise(runs, default) else 'within'} noise.")
    return lines
