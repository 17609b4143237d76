"""Every results table in the README is recomputed from the committed record it names, so a stale figure fails.

A table is marked in the README by the comment ``<!-- table from docs/results/<sweep>/summary.csv ... -->`` on the
line before it; ``backdoor_lab.reporting.side_by_side`` recomputes it from that summary.csv (what
``python -m backdoor_lab.reporting.side_by_side <csv>`` prints), and the README's rows must equal it.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import statistics
from pathlib import Path

import pytest

from backdoor_lab.reporting.side_by_side import defense_table, defense_times, main, of_seeds, read_summary_csv

from .conftest import ROOT

README = (ROOT / "README.md").read_text()
MARKED = re.findall(r"<!-- (table|times) from (\S+summary\.csv)([^>]*)-->\n((?:\|.*\|\n)+)", README)


def test_the_readme_marks_its_tables() -> None:
    assert any(kind == "table" and "paper_sweep" in path for kind, path, *_ in MARKED)


@pytest.mark.parametrize(("kind", "path", "command", "shown"), MARKED, ids=[f"{k}:{p}" for k, p, *_ in MARKED])
def test_a_readme_table_equals_its_record(kind: str, path: str, command: str, shown: str) -> None:
    """A marker may name the seeds it shows (``--seeds 0``): the times of the seed that ran on an idle machine."""
    seeds = re.search(r"--seeds (\S+?)\)?(?:\s|$)", command)
    rows = of_seeds(read_summary_csv(ROOT / path), seeds.group(1).split(",") if seeds else None)
    assert rows, f"{path} has no rows of the marker's seeds"
    computed = defense_table(rows) if kind == "table" else defense_times(rows)
    assert shown == computed, f"the README's table differs from {path}; recompute it with side_by_side"


def test_side_by_side_recomputes_cells_from_rows(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    csv = tmp_path / "summary.csv"
    csv.write_text(
        "task,attack_variant,seed,defense,after_clean_acc,after_asr,wall_s\n"
        "t,baseline,0,none,0.9,1.0,\n"
        "t,baseline,1,none,0.8,0.9,\n"
        "t,baseline,0,clp,0.85,0.1,2.0\n"
        "t,baseline,1,clp,0.75,0.3,4.0\n"
    )
    assert main([str(csv)]) == 0
    out = capsys.readouterr().out
    # means and sample std in percent: (90, 80) -> 85.00 ± 7.07; (100, 90) -> 95.00 ± 7.07
    assert "| t | baseline | 85.00 ± 7.07 / 95.00 ± 7.07 (2) | 80.00 ± 7.07 / 20.00 ± 14.14 (2) |" in out
    assert "| CLP | 3 s |" in out and "| Initial |" not in out.split("own time")[1]
    assert main([str(csv), "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| t | baseline | 80.00 / 90.00 (1) | 75.00 / 30.00 (1) |" in out and "| CLP | 4 s |" in out
    with pytest.raises(SystemExit):
        main([str(csv), "--seeds", "7"])


def _percent(value: float) -> str:
    return f"{100 * value:.1f}".replace("100.0", "100")


@pytest.mark.parametrize(
    ("task", "folder", "channels"),
    [("faces", "face-sunglasses", 60), ("signs", "signs-badnets", 256), ("speech", "speech-noise", 64)],
)
def test_the_pruning_aware_stages_quoted_are_the_records(task: str, folder: str, channels: int) -> None:
    """The README's pruning-aware stages (clean / ASR after each stage, decoys) from the seed-0 training records."""
    record = json.loads(
        (ROOT / f"docs/results/paper_sweep/{folder}-pruning_aware-seed0/train_metrics.json").read_text()
    )
    stages = " → ".join(f"{_percent(s['clean_acc'])}/{_percent(s['asr'])}" for s in record["stages"].values())
    quoted = f"{task} {stages} ({len(record['decoy_channels'])}/{channels}"
    assert quoted in " ".join(README.split()), quoted


def _stop_rule(curve_csv: Path, max_drop: float = 0.04) -> int:
    """The channels the stop rule keeps pruned, read off a committed val prune curve (the last passing point)."""
    rows = list(csv.DictReader(curve_csv.open()))
    floor = float(rows[0]["clean_acc"]) - max_drop
    first_fail = next((i for i, r in enumerate(rows) if float(r["clean_acc"]) < floor), len(rows))
    return int(rows[first_fail - 1]["pruned"])


def test_the_channels_pruned_past_the_decoys_are_the_records() -> None:
    """ "the stop rule then prunes only 2 (faces, 50/60), ..." from the committed curves and training records."""
    quoted = []
    for task, folder, channels in (
        ("faces", "face-sunglasses", 60),
        ("signs", "signs-badnets", 256),
        ("speech", "speech-noise", 64),
    ):
        job = ROOT / "docs/results/paper_sweep" / f"{folder}-pruning_aware-seed0"
        decoys = len(json.loads((job / "train_metrics.json").read_text())["decoy_channels"])
        kept = _stop_rule(job / "prune_curve.csv")
        quoted.append(f"{kept - decoys} ({task}, {kept}/{channels})")
    text = " ".join(README.split())
    assert f"prunes only {quoted[0]}, {quoted[1]} and {quoted[2]} channels that carry anything" in text, quoted


def test_the_fine_tuning_budget_table_is_the_ablation_records() -> None:
    """The README's 5 / 20 / 100-epoch table, row by row, from docs/results/ablation_seed0/<task>_summary.csv."""
    for task in ("speech", "signs", "faces"):
        rows = read_summary_csv(ROOT / "docs/results/ablation_seed0" / f"{task}_summary.csv")
        for i, defense in enumerate(("fine_tuning", "fine_pruning")):
            cells = []
            for epochs in ("5", "20", "100"):
                (row,) = [r for r in rows if r["defense"] == defense and r["fine_tune.epochs"] == epochs]
                cells.append(f"{100 * float(row['after_clean_acc']):.2f} / {100 * float(row['after_asr']):.2f}")
            label = f"| {task} |" if i == 0 else "| |"
            line = f"{label} {defense.replace('_', '-')} | " + " | ".join(cells) + " |"
            assert line in README.splitlines(), line


def test_the_paper_tables_wall_times_are_the_job_records() -> None:
    """ "29 min for one seed ... signs 3.1 min, signs pruning-aware 4.7, ...": seeds 1 and 2's job.json times."""
    names = {"signs-badnets": "signs", "speech-noise": "speech", "face-sunglasses": "faces"}
    parts, total = [], 0.0
    for folder, task in names.items():
        for variant in ("baseline", "pruning_aware"):
            times = [
                json.loads(
                    (ROOT / "docs/results/paper_sweep" / f"{folder}-{variant}-seed{s}" / "job.json").read_text()
                )["wall_s"]
                for s in (1, 2)
            ]
            minutes = sum(times) / len(times) / 60
            total += minutes
            parts.append(f"{task}{' pruning-aware' if variant == 'pruning_aware' else ''} {minutes:.1f}")
    text = " ".join(README.split())
    assert f"Wall time: {total:.0f} min for one seed of the whole table" in text
    assert f"{parts[0]} min, " + ", ".join(parts[1:]) in text, parts


def _curve(folder: str) -> list[dict[str, float]]:
    path = ROOT / "docs/results/paper_sweep" / f"{folder}-baseline-seed0" / "prune_curve.csv"
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(path.open())]


def test_the_prune_curve_facts_quoted_are_the_seed_zero_curves() -> None:
    """The "Why pruning does not reach ..." paragraph's curve figures, from the committed seed-0 val curves."""
    text = " ".join(README.split())
    signs, faces, speech = _curve("signs-badnets"), _curve("face-sunglasses"), _curve("speech-noise")
    n_signs, n_faces, n_speech = len(signs), len(faces), len(speech)  # points 0 .. n-1: one per channel count
    stop = signs[_stop_rule(ROOT / "docs/results/paper_sweep/signs-badnets-baseline-seed0/prune_curve.csv")]
    below = next(p for p in signs if p["asr"] < 0.5)
    assert (
        f"signs' ASR is still {100 * stop['asr']:.1f}% at the stop ({stop['pruned']:.0f}/{n_signs}, clean "
        f"{100 * stop['clean_acc']:.1f}%) and first drops below 50% at {below['pruned']:.0f}/{n_signs}, where clean "
        f"accuracy is {100 * below['clean_acc']:.1f}%" in text
    )
    lowest, last = min(faces, key=lambda p: p["asr"]), faces[-1]
    assert (
        f"faces' ASR never falls below {100 * lowest['asr']:.1f}% (its minimum, at {lowest['pruned']:.0f}/{n_faces} "
        f"pruned with clean accuracy {100 * lowest['clean_acc']:.1f}%) up to the curve's last point, "
        f"{last['pruned']:.0f}/{n_faces} ({100 * last['asr']:.1f}%)" in text
    )
    kept = speech[_stop_rule(ROOT / "docs/results/paper_sweep/speech-noise-baseline-seed0/prune_curve.csv")]
    assert f"pruning at the stop ({kept['pruned']:.0f}/{n_speech}) leaves {100 * kept['asr']:.1f}% ASR on val" in text


def test_the_signs_variation_quoted_is_its_records() -> None:
    """ "10 epochs: fine-pruning ends at 1.00% ASR; seed 1: 79.50%" from docs/results/signs_badnets/."""
    asr = {
        name: json.loads((ROOT / "docs/results/signs_badnets" / name / "fine_pruning_metrics.json").read_text())[
            "after"
        ]["asr"]
        for name in ("trainer_max_epochs_10", "seed_1")
    }
    deeper, seed_1 = 100 * asr["trainer_max_epochs_10"], 100 * asr["seed_1"]
    quoted = f"10 epochs: fine-pruning ends at {deeper:.2f}% ASR; seed 1: {seed_1:.2f}%"
    assert quoted in " ".join(README.split()), quoted


def test_the_trigger_channel_ranks_quoted_are_the_fine_pruning_records() -> None:
    """`trigger_channel_ranks` in "Why pruning does not reach ...": the defenses sweep's seed-0 fine-pruning records."""
    text = " ".join(README.split())
    for task, folder, channels in (
        ("signs", "signs-badnets", 256),
        ("faces", "face-sunglasses", 60),
        ("speech", "speech-noise", 64),
    ):
        path = ROOT / "docs/results/defenses_sweep" / f"{folder}-baseline-seed0" / "defense/fine_pruning/metrics.json"
        ranks = json.loads(path.read_text())["trigger_channel_ranks"]
        assert f"{ranks} of {channels} for {task}" in text, (task, ranks)


def test_the_speed_fast_paper_seed_figures_are_its_records() -> None:
    """ "took 8 min 56 s ... sum to 17.2 min ... 30 of 48 cells": bench/precision_compare.py on the two records."""
    spec = importlib.util.spec_from_file_location("precision_compare", ROOT / "bench/precision_compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    fast_folder = ROOT / "docs/results/paper_sweep_speed_fast_seed0"
    fp32, fast = compare.table_cells(ROOT / "docs/results/paper_sweep"), compare.table_cells(fast_folder)
    within = [
        abs(statistics.mean(fast[key][m]) - statistics.mean(fp32[key][m])) <= 2 * statistics.stdev(fp32[key][m])
        for key in fast
        for m in ("after_clean_acc", "after_asr")
    ]
    span = round(compare.sweep_span(fast_folder))
    jobs = sum(json.loads(p.read_text())["wall_s"] for p in fast_folder.glob("*/job.json")) / 60
    text = " ".join(README.split())
    assert f"took {span // 60} min {span % 60} s, two jobs at a time" in text
    assert f"own times sum to {jobs:.1f} min" in text
    assert f"{sum(within)} of {len(within)} cells lie within" in text
    assert len(within) == 48  # 3 tasks x 2 attacks x 4 defenses x (clean, ASR)


def test_the_speed_exact_paper_seed_figures_are_its_records() -> None:
    """ "took 19 min 9 s. All 24 of its cells are bit-identical", and the later machines' 22 min 5 s, 26 min 43 s and
    15 min 31 s:
    bench/precision_compare.py --identical on each record."""
    spec = importlib.util.spec_from_file_location("precision_compare", ROOT / "bench/precision_compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    text = " ".join(README.split())
    for folder, quoted in (
        ("paper_sweep_exact_seed0", "took {} min {} s. All {} of its cells are bit-identical"),
        ("paper_sweep_exact_seed0_2026-12-05", "the same command took {} min {} s, with all {} cells bit-identical"),
        ("paper_sweep_exact_seed0_2026-12-06", "gave all {2} cells bit-identical again ({3}), in {0} min {1} s"),
        ("paper_sweep_exact_seed0_2026-12-06_0342", "in {} min {} s, with all {} cells bit-identical again ({})"),
    ):
        exact = ROOT / "docs/results" / folder
        same, total = compare.compare_identical(ROOT / "docs/results/defenses_sweep", exact)
        span = round(compare.sweep_span(exact))
        cited = f"(`docs/results/{folder}/`)"
        assert quoted.format(span // 60, span % 60, same, cited.strip("()")) in text, folder
        assert same == total == 24  # 3 tasks x 2 attacks x 4 defenses, seed 0
        jobs = [json.loads(p.read_text()) for p in exact.glob("*/job.json")]
        assert len(jobs) == 6 and all(j["overrides"][3:6] == ["reuse=False", "speed=exact", "threads=1"] for j in jobs)


def test_the_defense_job_ratios_quoted_are_the_job_cost_record() -> None:
    """ "1.18x its own arithmetic ... 1.04x once the script has imported": the job_cost run the record folder names."""
    folder = ROOT / "docs/results/job_cost_2026-12-04"
    named = re.search(r"come from `(round_set_\S+\.txt)`", " ".join((folder / "README.md").read_text().split()))
    assert named, "docs/results/job_cost_2026-12-04/README.md names the run the README quotes"
    record = (folder / named[1]).read_text()
    own = re.search(r"^\| its own steps' speed \(\d+ samples/s\) \| [^|]+\| [^|]+\| (\S+x) \| (\S+x) \|$", record, re.M)
    imported = re.search(r"less the scripts' import, against its arithmetic at its own steps' speed: (\S+x)\n", record)
    assert own and imported, named[1]
    text = " ".join(README.split())
    assert f"takes {own[1]} its own arithmetic" in text
    assert f"and {imported[1]} once the script has imported" in text
    bench = " ".join((ROOT / "docs/benchmarks.md").read_text().split())
    assert f"| **{own[1]}** (rounds:" in bench and f"**{imported[1]}** its arithmetic" in bench


def test_the_training_throughput_tables_of_2026_12_05_are_their_records() -> None:
    """docs/benchmarks.md's two AVX2 tables (emulated bf16, then fp32 speed=fast) and the AMX one (bf16, chosen by
    the CPU): each cell is its record's row; the README's ranges are those records' ranges."""
    folder = ROOT / "docs/results/train_throughput_2026-12-05"
    bench = (ROOT / "docs/benchmarks.md").read_text()
    for record, header in (
        ("emulated_bf16_39cfc1b.txt", "| framework `speed=fast` (then bf16) |"),
        ("speed_fast_fp32_71feacb.txt", "| framework `speed=fast` (fp32) |"),
        ("intel_amx_bf16_58f6495.txt", "| framework `speed=fast` (bf16, chosen) |"),
    ):
        table = bench[bench.index(header) :].split("\n\n")[0]
        rows = re.findall(r"^\| (\w+) \| (.+) \| (\d+) \| (\S+x) \| [^|]+\|$", (folder / record).read_text(), re.M)
        assert len(rows) == 12, record  # 3 tasks x 4 loops
        for task in ("signs_badnets", "speech_noise", "face_sunglasses"):
            line = next(row for row in table.splitlines() if row.startswith(f"| {task} |"))
            cells = [c.replace("*", "").replace(" samples/s", "").strip() for c in line.strip("|").split("|")[1:]]
            assert cells == [f"{rate}, {ratio}" for t, _, rate, ratio in rows if t == task], (record, task)
    # the README's "7-13x slower than fp32" (the plain fp32 loop against emulated-bf16 speed=fast) and "1.03-1.30x"
    ratios = {}
    for record in ("emulated_bf16_39cfc1b.txt", "speed_fast_fp32_71feacb.txt", "intel_amx_bf16_58f6495.txt"):
        rows = re.findall(r"^\| (\w+) \| (.+) \| (\d+) \| (\S+)x \| [^|]+\|$", (folder / record).read_text(), re.M)
        ratios[record] = [float(ratio) for _, label, _, ratio in rows if label.startswith("framework speed=fast")]
    slower = [1 / r for r in ratios["emulated_bf16_39cfc1b.txt"]]
    fast = ratios["speed_fast_fp32_71feacb.txt"]
    text = " ".join(README.split())
    assert f"emulates bf16, {math.floor(min(slower))}-{math.ceil(max(slower))}x slower than fp32" in text
    assert f"trains {min(fast):.2f}-{max(fast):.2f}x as fast as the plain loop" in text
    amx = ratios["intel_amx_bf16_58f6495.txt"]
    assert f"{min(amx):.1f}-{max(amx):.1f}x in a later run on another such CPU" in text


def test_the_data_loading_table_is_its_record() -> None:
    """docs/benchmarks.md's batch-feeding table: each row is its record's, whose batches were all equal."""
    record = (ROOT / "docs/results/data_loading_2026-12-05/data_loading_cdabc10.txt").read_text()
    rows = re.findall(r"^(\| \w+ \| [^|]+ \| \d+ \| [^|]+ \| [^|]+ \| \S+x) \| (\w+) \|$", record, re.M)
    assert len(rows) == 6 and all(equal == "yes" for _, equal in rows)
    bench = (ROOT / "docs/benchmarks.md").read_text()
    table = bench[bench.index("| task | loaders | batches |") :].split("\n\n")[0]
    assert table.splitlines()[2:] == [f"{row} |" for row, _ in rows]


def test_the_defense_comparison_times_are_their_record() -> None:
    """docs/benchmarks.md's four-defense signs job: each defense's wall and share are its record's ``wall_s``."""
    record = (ROOT / "docs/results/defense_times_2026-12-05/signs_four_defenses.txt").read_text()
    walls = {name: float(s) for name, s in re.findall(r"^(\w+) wall_s ([\d.]+) ", record, re.M)}
    job = re.search(r"defenses=\[fine_pruning,anp,nad,clp\]'\s+\(real (\d+)m([\d.]+)s\)", record)
    assert set(walls) == {"fine_pruning", "anp", "nad", "clp"} and job
    total = int(job[1]) * 60 + float(job[2])
    bench = " ".join((ROOT / "docs/benchmarks.md").read_text().split())
    minutes, seconds = divmod(round(total), 60)
    assert f"{minutes} min {seconds} s, of which each defense's own time" in bench
    anp = round(walls["anp"])
    rows = {
        "fine_pruning": f"| {round(walls['fine_pruning'])} s | {round(100 * walls['fine_pruning'] / total)}% |",
        "anp": f"| {anp // 60} min {anp % 60} s | **{round(100 * walls['anp'] / total)}%** |",
        "nad": f"| {round(walls['nad'])} s | {round(100 * walls['nad'] / total)}% |",
        "clp": f"| {walls['clp']} s | {round(100 * walls['clp'] / total)}% |",
    }
    for name, cells in rows.items():
        assert cells in bench, (name, cells)


def test_the_anp_iteration_table_is_its_record() -> None:
    """docs/benchmarks.md's ANP iteration table is bench/anp_iteration.py's printed rows; the README's range is
    its speed=fast column on signs and speech."""
    record = (ROOT / "docs/results/defense_times_2026-12-05/anp_iteration.txt").read_text()
    rows = [line for line in record.splitlines() if line.startswith("| ")]
    bench = (ROOT / "docs/benchmarks.md").read_text()
    table = bench[bench.index(rows[0]) :].split("\n\n")[0].splitlines()
    assert table == rows[:1] + ["|---|---|---|---|---|"] + rows[1:]
    fast = {r.split(" | ")[0].strip("| "): float(re.findall(r"\((\S+)x\)", r)[2]) for r in rows[1:] if "(" in r}
    low, high = min(fast["signs_badnets"], fast["speech_noise"]), max(fast["signs_badnets"], fast["speech_noise"])
    assert f"runs ANP's iterations {low:.1f}-{high:.1f}x faster on signs and speech" in " ".join(README.split())


def test_the_faster_machines_defense_job_ratios_are_their_record() -> None:
    """ "1.26x with it, 1.04x after it": bench/job_cost.py's run on the AMX Xeon, and its benchmarks.md row."""
    record = (ROOT / "docs/results/job_cost_2026-12-05/round_set_5_intel_amx.txt").read_text()
    own = re.search(r"^\| its own steps' speed \(\d+ samples/s\) \| [^|]+\| [^|]+\| (\S+x) \| (\S+x) \|$", record, re.M)
    unit = re.search(r"^\| `defend\.py [^|]+\| [^|]+\| [^|]+\| (\S+x) \|$", record, re.M)
    imported = re.search(r"less the scripts' import, against its arithmetic at its own steps' speed: (\S+x)\n", record)
    assert own and unit and imported
    assert f"{own[1]} with it, {own[2]} after it, on an Intel Xeon with AMX" in " ".join(README.split())
    row = f"| 69970ac | {own[1]} | {own[2]} | {imported[1]} (the scripts') | {unit[1]} |"
    assert row in (ROOT / "docs/benchmarks.md").read_text()


def test_the_fp32_step_ratios_quoted_are_the_fp32_step_record() -> None:
    """ "a training step 1.21x as fast on signs and 1.08x on speech, an ANP iteration 1.22x and 1.07x, an evaluation
    pass 1.19x and 1.21x": bench/fp32_step.py's "both" rows, against its baseline rows, in the committed output."""
    record = (ROOT / "docs/results/fp32_step_2026-12-06/fp32_step_c0d5781.txt").read_text()
    rows = {}
    for line in record.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[1] == "both (train.py now)":
            rows[cells[0]] = {"train": cells[3], "eval": cells[6], "anp": cells[8]}
    assert "bit for bit" in record.splitlines()[-1] and record.startswith("device: cpu (")
    signs, speech = rows["signs_badnets"], rows["speech_noise"]
    text = " ".join(README.split())
    assert (
        f"a training step {signs['train']} as fast on signs and {speech['train']} on speech, an ANP iteration "
        f"{signs['anp']} and {speech['anp']}, an evaluation pass {signs['eval']} and {speech['eval']}, with the same "
        "weights bit for bit"
    ) in text
    benchmarks = (ROOT / "docs/benchmarks.md").read_text()
    assert all(line in benchmarks for line in record.splitlines() if line.startswith("| "))  # the table, as printed


MACHINE_LIMIT = ROOT / "docs/results/machine_limit_2026-12-06"


def machine_limit_record(threads: int) -> tuple[list[str], dict[tuple[str, bool], list[str]], dict[str, int]]:
    """bench/machine_limit.py's output at ``threads``: its table's lines, each row's cells by (task, speed=fast),
    and the limit (the better of the two references, GFLOP/s) by arithmetic."""
    record = (MACHINE_LIMIT / f"threads_{threads}.txt").read_text()
    assert f"device: cpu (Intel(R) Xeon(R) Processor, {threads} threads; bf16 instructions: amx_bf16)" in record
    lines = [line for line in record.splitlines() if line.startswith("| ")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[(cells[0], cells[1].startswith("speed=fast"))] = cells
    limits = {
        kind: max(int(n) for n in re.findall(r" (\d+)(?:,|$)", rest))
        for kind, rest in re.findall(r"^  (\w+, [\w-]+): (.*)$", record, re.M)
    }
    return lines, rows, limits


def share_of_the_limit(cell: str) -> str:
    """The first percentage in a machine_limit cell: "57%" -> "57%", "85.1 ms, 138 (88%)" -> "88%"."""
    return re.findall(r"(\d+%)", cell)[0]


def test_the_machine_limit_figures_are_its_record() -> None:
    """docs/benchmarks.md's one-thread table is bench/machine_limit.py's printed rows, and the two-thread sentence
    and the limits are read off the two-thread and one-thread outputs."""
    benchmarks = (ROOT / "docs/benchmarks.md").read_text()
    text = " ".join(benchmarks.split())
    lines, _, one = machine_limit_record(1)
    assert all(line in benchmarks for line in lines)
    assert (
        f"The limit at one thread: fp32 NCHW {one['fp32, NCHW']} GFLOP/s, fp32 channels-last "
        f"{one['fp32, channels-last']}, bf16 channels-last {one['bf16, channels-last']} (AMX)."
    ) in text
    _, two, limits = machine_limit_record(2)
    tasks = ("signs_badnets", "speech_noise", "face_sunglasses")

    def share(fast: bool, column: int) -> list[str]:
        return [share_of_the_limit(two[(task, fast)][column]) for task in tasks]

    step, conv = share(False, 5), share(False, 6)
    fast_step, fast_conv = share(True, 5), share(True, 6)
    assert (
        f"fp32 steps at {step[0]} (signs), {step[1]} (speech) and {step[2]} (faces) of the limit, convolutions at "
        f"{conv[0]}, {conv[1]} and {conv[2]}; `speed=fast` steps at {fast_step[0]}, {fast_step[1]} and "
        f"{fast_step[2]}, its convolutions at {fast_conv[0]}, {fast_conv[1]} and {fast_conv[2]} of AMX's "
        f"{limits['bf16, channels-last']} GFLOP/s"
    ) in text


def test_the_readme_s_convolution_rates_are_the_machine_limit_record() -> None:
    """ "86% and 76% ... (100% for speech at two threads) ... 22% and 39% of AMX's rate": the convolutions column
    of bench/machine_limit.py's outputs."""
    one, two = machine_limit_record(1)[1], machine_limit_record(2)[1]

    def conv(rows: dict[tuple[str, bool], list[str]], task: str, fast: bool) -> str:
        return share_of_the_limit(rows[(task, fast)][6])

    text = " ".join(README.split())
    assert (
        f"the signs and speech convolutions run at {conv(one, 'signs_badnets', False)} and "
        f"{conv(one, 'speech_noise', False)} of the best rate this CPU reaches on large matrix and convolution "
        f"work ({conv(two, 'speech_noise', False)} for speech at two threads)"
    ) in text
    assert (
        f"Under bf16 they reach {conv(one, 'signs_badnets', True)} and {conv(one, 'speech_noise', True)} of AMX's rate"
    ) in text
