"""The report's picks, intervals, paired differences, exports and figures on synthetic runs with
answers known by hand (tests/test_record_report.py covers the older tables and the pairing)."""
import csv
import io

import pytest

from test_record_report import run_of, unit, write_run
from treedaps.record import timed_with_compilation
from treedaps.report import main
from treedaps.report.cli import full_report
from treedaps.report.differences import differences
from treedaps.report.export import to_csv, to_latex
from treedaps.report.picks import pick_value, success_at, twin_choice
from treedaps.report.quality import comparability_warnings, quality_rows
from treedaps.report.stats import bootstrap_ci, paired_difference, rate, wilson


def twin_unit(index, seed=42, **extra):
    """Four final particles: 0 = truth (loss 1.00, prior 5), 1 = twin (loss 1.01, prior 3),
    2 = blurry truth (loss 1.50), 3 = distractor (loss 9)."""
    u = unit(index, [30.0, 10.0, 20.0, 8.0], modes=["0", "180", "0", "other"], seed=seed, **extra)
    for p, (loss, prior, p180) in zip(u["particles"], [(1.00, 5.0, 10.0), (1.01, 3.0, 29.0),
                                                      (1.50, 1.0, 9.0), (9.0, 0.5, 7.0)]):
        p.update(loss=loss, prior_score=prior, psnr_0=p["psnr"], psnr_180=p180, ssim=p["psnr"] / 40)
    return u


def test_picks_by_hand():
    u = twin_unit(0)
    assert pick_value(u, "loss", "psnr") == 30.0                   # lowest loss: particle 0
    assert pick_value(u, "prior", "psnr") == 10.0                  # tied (<= 1.05 x 1.00): 0 and 1; prior 3 < 5
    assert pick_value(u, "prior", "psnr_twin") == 29.0             # the twin is fine up to rotation
    assert pick_value(u, "prior", "psnr", tol=1.6) == 20.0         # 2 joins the candidates (prior 1)
    assert pick_value(u, "oracle", "lpips") is None
    assert twin_choice(u, "prior") is False and twin_choice(u, "loss") is True
    for p in u["particles"]:
        p.pop("prior_score")
    assert pick_value(u, "prior", "psnr") is None                  # an older run: no prior pick
    assert pick_value(u, "oracle", "psnr", k=2) == 30.0 and pick_value(u, "oracle", "psnr", k=1) == 30.0
    assert pick_value(twin_unit(0), "oracle", "psnr_twin", k=2) == 30.0


def test_oracle_pick_equals_the_merged_best_of_n():
    units = [unit(0, [20.0, 25.0]), unit(1, [10.0, 30.0, 12.0])]
    run = run_of("x", units)
    rows = {(r["pick"], r["metric"]): r for r in quality_rows([run])}
    assert rows[("oracle", "psnr")]["mean"] == pytest.approx(run["psnr"]["summary"]["best_of_n_mean"])
    assert rows[("oracle", "psnr")]["std"] == pytest.approx(run["psnr"]["summary"]["best_of_n_std"])
    assert rows[("loss", "psnr")]["n"] == 2 and rows[("prior", "psnr")]["n"] == 0


def test_wilson_interval_by_hand():
    # 7/10, z = 1.96: centre (0.7 + 0.19207) / 1.38415 = 0.64449, half-width 1.41601 * sqrt(0.0306036) = 0.24772
    lo, hi = wilson(7, 10)
    assert lo == pytest.approx(0.3968, abs=5e-5) and hi == pytest.approx(0.8922, abs=5e-5)
    assert wilson(0, 0) == (None, None)
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0
    r = rate([True, False, None, True])
    assert (r["k"], r["n"], r["rate"]) == (2, 3, pytest.approx(2 / 3))


def test_bootstrap_interval_fixed_seed_and_contains_the_mean():
    vals = [1.0, 2.0, 3.0, 4.0, 10.0]
    lo, hi = bootstrap_ci(vals)
    assert (lo, hi) == bootstrap_ci(vals) and lo < 4.0 < hi and lo >= 1.0 and hi <= 10.0
    assert bootstrap_ci([3.0]) == (None, None)
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)


def test_paired_difference_and_wilcoxon_by_hand():
    a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    b = [x + 1.0 for x in a]
    d = paired_difference(a, b)
    assert d["mean"] == 1.0 and d["lo"] == 1.0 and d["hi"] == 1.0 and d["n"] == 6
    assert d["p"] == pytest.approx(2 / 64)               # exact: all 6 differences positive
    d = paired_difference([1.0, None, 3.0], [2.0, 5.0, 1.0])
    assert d["n"] == 2 and d["mean"] == pytest.approx(-0.5)
    assert paired_difference([1.0, 2.0], [1.0, 2.0])["p"] is None


def test_differences_between_runs_on_the_same_measurements():
    ua = {(i, 42): twin_unit(i) for i in range(3)}
    ub = {(i, 42): twin_unit(i) for i in range(3)}
    for u in ub.values():
        u["time"]["total_s"] = 8.0                       # A: 6.0
        u["particles"][1]["prior_score"] = 9.0          # B's prior now prefers the truth
    rows = {(r["quantity"], r["pick"]): r for r in differences(ua, ub, sorted(ua))}
    assert rows[("psnr", "prior")]["mean"] == pytest.approx(20.0)   # 10 -> 30 dB in every measurement
    assert rows[("psnr", "prior")]["p"] == pytest.approx(0.25)      # 3 of 3 positive, exact
    assert rows[("psnr", "oracle")]["mean"] == 0.0
    assert rows[("seconds / measurement", "")]["mean"] == pytest.approx(2.0)
    assert rows[("peak MB", "")]["n"] == 0


def test_success_recomputed_at_another_threshold():
    u = twin_unit(0)          # psnr_0 / psnr_180: (30, 10), (10, 29), (20, 9), (8, 7)
    assert success_at(u, "both_modes_covered", 15) is True
    assert success_at(u, "both_modes_covered", 29.5) is False
    assert success_at(u, "found_truth", 30) is True and success_at(u, "found_either", 31) is False


def test_comparability_warnings_name_the_difference():
    a = run_of("A", [unit(0, [20.0]), unit(1, [21.0])])
    b = run_of("B", [unit(0, [20.0]), unit(1, [21.0], seed=7)])
    c = run_of("C", [unit(0, [20.0]), unit(1, [21.0])])
    c["metadata"]["num_samples"] = 8
    text = "\n".join(comparability_warnings([a, b, c]))
    assert "B and A: seeds differ ([42] vs [42, 7])" in text and "1 common of 2 / 2" in text
    assert "C has N = 8 particles, A N = 4" in text
    assert comparability_warnings([a, run_of("A2", [unit(0, [1.0]), unit(1, [2.0])])]) == []


def test_report_warns_under_the_time_table_when_a_measurement_was_timed_with_a_compilation():
    units = [unit(0, [20.0]), unit(1, [21.0])]
    for u, compiled in zip(units, (3, 0)):
        u["unit"], u["time"]["compilations"] = f"0000{u['index']}", compiled
    a = run_of("A", units)
    a["metadata"]["precision"] = dict(timed_with_compilation=timed_with_compilation(units))
    clean = run_of("B", [unit(0, [20.0]), unit(1, [21.0])])
    text = full_report([a, clean])
    line = "warning: A: the times of 1 measurement(s) include a compilation (00000)"
    time_section = text.split("## Time")[1].split("## Peak memory")[0]
    assert line in time_section and "warning: B" not in text
    assert "\n\n" + line in time_section            # its own paragraph, not a row of the table


def test_csv_and_latex_parse_with_a_pick_column():
    rows = quality_rows([run_of("exp_0", [twin_unit(0), twin_unit(1)])])
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert len(parsed) == 3 * 4 and {r["pick"] for r in parsed} == {"oracle", "loss", "prior"}
    prior = next(r for r in parsed if r["pick"] == "prior" and r["metric"] == "psnr")
    assert float(prior["mean"]) == 10.0 and prior["n"] == "2" and prior["units"] == "2"
    assert next(r for r in parsed if r["metric"] == "lpips")["mean"] == ""
    tex = to_latex(rows)
    assert tex.count("\\\\") == 1 + 3 and "exp\\_0" in tex and "\\begin{tabular}{llcccc}" in tex
    assert tex.count("&") == 5 * 4


def two_runs(tmp_path):
    return (write_run(tmp_path / "exp0_a", "exp0_a", [twin_unit(0), twin_unit(1)]),
            write_run(tmp_path / "b", "resample_b", [twin_unit(0), twin_unit(1)]))


def test_cli_csv_latex_and_paired_differences(tmp_path, capsys):
    a, b = two_runs(tmp_path)
    assert main([str(a), str(b), "--pair", str(a), str(b), "--csv", str(tmp_path / "out" / "q.csv"),
                 "--latex", str(tmp_path / "q.tex")]) == 0
    out = capsys.readouterr().out
    assert "## Quality by pick" in out and "| exp0_a | prior | 10.00 ± 0.00 [10.00, 10.00] |" in out
    assert "paired differences" in out and "warning: not bitwise-paired" in out
    assert len(list(csv.DictReader((tmp_path / "out" / "q.csv").open()))) == 2 * 3 * 4
    assert "\\end{tabular}" in (tmp_path / "q.tex").read_text()
    assert main([str(a), "--tolerance", "0.9"]) == 2


@pytest.mark.slow
def test_cli_writes_every_figure(tmp_path):
    a, b = two_runs(tmp_path)
    plots = tmp_path / "plots"
    assert main([str(a), str(b), "--plots", str(plots)]) == 0
    stems = {"psnr_by_pick", "pairwise_z0y_vs_step", "commit_steps", "time_memory_by_phase",
             "quality_vs_compute", "mode_coverage", "success_vs_threshold", "genealogy_exp0_a", "genealogy_resample_b"}
    written = {p.name for p in plots.iterdir()}
    assert written == {f"{s}.{ext}" for s in stems for ext in ("png", "pdf")}
    assert all((plots / f).read_bytes()[:4] in (b"\x89PNG", b"%PDF") for f in written)
