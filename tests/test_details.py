"""`amp_lib.details`: what a report says once, after its answer (caveats, causes, timing, fp8 layers, energy,
noise, every measurement, the rules), and summary.md, the whole report as markdown, pinned by goldens."""

from __future__ import annotations

import re

from factories import SWEEP, THREE, make_result, seeds

from amp_lib import details as D
from amp_lib import render as T
from amp_lib.details import summary_markdown
from amp_lib.render import answer, format_table, reason
from amp_lib.report import build_report

# --- summary.md: goldens ----------------------------------------------------------------------------


def test_golden_summary_of_a_three_seed_sweep(golden) -> None:
    report = build_report(SWEEP)
    summary = summary_markdown(report)
    golden("summary_three_seeds.md", summary)
    assert summary.startswith(f"# AMP Workbook sweep summary\n\n{T.context_markdown(report)}\n\n## Answer\n\n{answer(report)}\n")
    for part in (D.verdict_markdown(report), D.memory_markdown(report), format_table(report.table),
                 D.rules_markdown(report.tolerance), D.caveats_markdown(report)):  # fmt: skip
        assert summary.count(part) == 1  # each once
    assert not re.search(r"(?<![\w.])-\d[\d.]*x", summary)  # no ratio printed negative


def test_golden_summary_of_three_precisions_one_seed_each(golden) -> None:
    report = build_report(THREE)
    summary = summary_markdown(report)
    golden("summary_three.md", summary)
    (rec,) = report.recommendations
    assert rec.stay_in_fp32 and T.recommendations_markdown(report) == T.recommendation_markdown(rec)
    assert answer(report) == (
        "Stay in fp32 — no other precision was shown to be as good and measurably faster:\n"
        "- fp16-mixed inconclusive on quality (Δ +0.50% (one seed), one seed: no noise estimate).\n"
        "- bf16-mixed inconclusive on quality (Δ -0.50% (one seed), one seed: no noise estimate)."
    )


def test_golden_summary_of_two_settings(golden) -> None:
    runs = [
        *seeds("fp32", [2.0, 2.01], lr=0.01),
        *[
            make_result("bf16", s, effective="bf16-mixed", tps=t, mem=80, eval_loss=v, lr=0.01)
            for s, (v, t) in enumerate([(2.0, 1800.0), (2.01, 1850.0)])
        ],
        make_result(
            "fp16-mixed", status="diverged", error="loss became nan at step 7\ntrace", tps=None, eval_loss=None, lr=0.01
        ),
        make_result("fp32", status="oom", error="CUDA out of memory", tps=None, eval_loss=None, lr=0.1),
        make_result("bf16-mixed", tps=1500, lr=0.1),
    ]
    report = build_report(runs)
    summary = summary_markdown(report)
    golden("summary_two_settings.md", summary)
    first, second = report.recommendations
    assert T.recommendations_markdown(report) == f"{T.recommendation_markdown(first)}\n\n{T.recommendation_markdown(second)}"
    assert (first.setting, first.precision, second.setting, second.precision) == (
        "gpt-tiny lr=0.01", "bf16-mixed", "gpt-tiny lr=0.1", None,
    )  # fmt: skip
    assert reason(second).startswith("fp32 failed (oom: CUDA out of memory)")


# --- fp8 layer choices, MFU against both peaks, and energy --------------------------------


def fp8_plan():
    from amp_lib.fp8 import LayerPlan, LinearDecision

    decisions = (
        LinearDecision("blocks.0.qkv", 64, 192, True, "auto: K=64, N=192 pass torchao's thresholds for rowwise"),
        LinearDecision("lm_head", 64, 65, False, "dims not multiples of 16 (K=64, N=65): fp8 GEMMs need both to be"),
    )
    return LayerPlan("fp8-rowwise", "rowwise", "auto", False, ("output", "grad_input", "grad_weight"), decisions,
                     auto_rule="rowwise", tokens_per_step=2048)  # fmt: skip


def test_the_summary_lists_each_fp8_runs_linears_and_its_mfu_against_both_peaks_labelled() -> None:
    from dataclasses import replace

    mfu = {"mfu_vs_bf16_peak": 0.31, "mfu_vs_mixed_peak": 0.2, "mixed_peak_tflops": 1500.0, "fp8_flop_share": 0.6}
    runs = [*seeds("fp32", [2.0, 2.01]),
            *[replace(r, fp8_layers=fp8_plan()) for r in seeds("fp8-rowwise", [2.0, 2.01], metrics=mfu)]]  # fmt: skip
    text = D.fp8_markdown(build_report(runs))
    assert text.splitlines() == [
        "- **fp8-rowwise**: 1 of 2 linears in fp8 (fp8-rowwise, auto by torchao's rowwise rule; 2048 tokens per step)",
        "  - in fp8 (output, grad_input, grad_weight GEMMs): blocks.0.qkv",
        "  - lm_head (K=64, N=65): dims not multiples of 16 (K=64, N=65): fp8 GEMMs need both to be",
        "  - MFU against the bf16 dense peak: 31.0%",
        "  - MFU against the mixed peak (fp8 peak for the GEMMs that ran in fp8, bf16 for the rest): 20.0%",
    ]
    assert "## fp8 layers and MFU\n\n" + text in summary_markdown(build_report(runs))
    assert D.fp8_markdown(build_report(seeds("fp32", [2.0]))) == ""  # no fp8 run: no section


def test_energy_per_item_and_to_fp32s_quality_where_read_and_the_reason_where_not() -> None:
    from dataclasses import replace

    from factories import eval_curve

    from amp_lib.energy import EnergyReading

    def read(precision: str, seed: int, per_token: float, curve: tuple[float, ...]):
        result = make_result(precision, seed, evals=eval_curve(*curve), eval_loss=curve[-1], metrics={"items_per_step": 100})
        return replace(result, energy=EnergyReading(per_token * 3000, per_token, 3000, 10.0, ("GPU-x",)))

    runs = [read("fp32", s, 0.02, (2.5, 2.0)) for s in (0, 1)] + [read("bf16-mixed", s, 0.01, (2.0, 1.99)) for s in (0, 1)]
    text = D.energy_markdown(build_report(runs))
    # bf16 reaches fp32's best (+2%) at its first eval, step 10: 0.01 J/token x 100 tokens/step x 10 steps = 10 J
    assert text.splitlines() == [
        "- **fp32**: 0.02 ± 0 J per token, 6 ± 0 W, to fp32's quality 40 ± 0 J",  # mean ± std over the two seeds
        "- **bf16-mixed**: 0.01 ± 0 J per token, 3 ± 0 W, to fp32's quality 10 ± 0 J",
    ]
    cpu = EnergyReading(None, reason="no NVIDIA GPU: the run is on cpu")
    report = build_report([replace(r, energy=cpu) for r in seeds("fp32", [2.0, 2.01])])
    assert D.energy_markdown(report) == "- not measured: no NVIDIA GPU: the run is on cpu"
    assert "## Energy" not in summary_markdown(build_report(seeds("fp32", [2.0])))  # older results: no section
