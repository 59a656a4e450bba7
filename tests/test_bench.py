"""`make bench` end to end on a tiny model: every precision gets a row, ratios are against fp32."""

from __future__ import annotations

import pytest

from amp_lib.bench import bench, format_table, main
from amp_lib.train import RunConfig


@pytest.fixture(scope="module")
def rows():
    base = RunConfig(model="mlp", steps=6, warmup_steps=2, batch_size=4, log_every=2, device="cpu")
    return bench(base, ["fp32", "fp16-mixed"], repeats=1)


def test_bench_reports_each_precision_with_its_fallback(rows) -> None:
    assert [r.precision for r in rows] == ["fp32", "fp16-mixed"]
    assert rows[1].effective == "bf16-mixed" and "fp16" in rows[1].fallback_reason
    assert all(r.step_ms > 0 and r.bare_step_ms > 0 and r.items_per_s > 0 for r in rows)
    assert rows[0].unit == "samples"


def test_bench_table_quotes_ratios_against_the_fp32_row(rows) -> None:
    table = format_table(rows, "cpu")
    fp32_line, fp16_line = (line for line in table.splitlines() if line.startswith("| fp"))
    assert "| 1.00x |" in fp32_line
    ratio = rows[1].items_per_s / rows[0].items_per_s
    assert f"| {ratio:.2f}x |" in fp16_line
    assert "fallbacks:" in table


def test_bench_cli_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "--model",
                "mlp",
                "--precisions",
                "fp32",
                "--steps",
                "4",
                "--warmup-steps",
                "1",
                "--repeats",
                "1",
                "--batch-size",
                "2",
                "--device",
                "cpu",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert '"precision": "fp32"' in out.read_text()
    assert "| fp32 | fp32 |" in capsys.readouterr().out
