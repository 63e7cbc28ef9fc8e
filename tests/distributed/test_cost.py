"""The 6·N·D calculator against the costs the papers report, and Table 1's rows read through it."""

import pytest

from effref.distributed.cost import (
    PEAK_FLOPS,
    REPORTED_FLOPS,
    TABLE_1,
    chip_seconds,
    table_rows,
    training_days,
    training_flops,
    utilisation,
)

RUNS = {run.model: run for run in TABLE_1}


def test_table_1_has_the_survey_s_nineteen_rows():
    assert len(TABLE_1) == 19 and len(RUNS) == 19
    assert RUNS["LLaMA"].params == 65e9 and RUNS["LLaMA"].tokens == 1.4e12 and RUNS["LLaMA"].days == 21


def test_6nd_matches_gpt_3_s_reported_training_compute():
    """Brown et al. (2020) give 3.14e23 FLOPs for GPT-3 175B on 300B tokens; 6·N·D gives 3.15e23."""
    ours = training_flops(175e9, 300e9)
    assert ours == pytest.approx(REPORTED_FLOPS["GPT-3"], rel=0.01)


def test_llama_s_implied_utilisation_matches_its_reported_throughput():
    """Touvron et al. (2023a): ~380 tokens/s per A100 for LLaMA-65B, hence 21 days for 1.4T tokens on 2048 GPUs.

    That throughput is 6·N·380 FLOP/s per GPU; Table 1's chips × days imply the same utilisation within 2%.
    """
    from_throughput = 6 * 65e9 * 380 / PEAK_FLOPS["A100"]
    assert utilisation(RUNS["LLaMA"]) == pytest.approx(from_throughput, rel=0.02)


def test_dense_rows_land_at_plausible_utilisations_and_three_rows_cannot_be_right_as_printed():
    mfu = {run.model: utilisation(run) for run in TABLE_1 if utilisation(run) is not None}
    assert set(mfu) == {"BLOOM", "GLM", "LLaMA", "LLaMA-2", "Gopher", "LaMDA", "GLaM", "PanGu-Σ", "WeLM",
                        "AlexaTM", "CodeGeeX"}
    impossible = {model for model, share in mfu.items() if share > 1}
    assert impossible == {"Gopher", "LaMDA", "PanGu-Σ"}  # more FLOPs than the chips deliver at peak
    assert all(0.02 < share < 0.6 for model, share in mfu.items() if model not in impossible)


def test_a_mixture_of_experts_needs_its_activated_parameters():
    glam = RUNS["GLaM"]
    assert utilisation(glam, activated=False) > 1 > utilisation(glam) > 0.2


def test_training_days_inverts_the_utilisation():
    for run in TABLE_1:
        share = utilisation(run)
        if share is None or run.chips is None or share > 1:
            continue
        flops = training_flops(run.active_params or run.params, run.tokens)
        assert training_days(flops, run.chips, run.hardware, share) == pytest.approx(run.days)


def test_chip_days_come_from_gpu_days_when_the_table_gives_those():
    assert chip_seconds(RUNS["LLaMA-2"]) == 71_680 * 86_400
    assert chip_seconds(RUNS["OPT"]) is None


def test_table_rows_carry_the_calculator_beside_the_reported_columns():
    rows = {row["model"]: row for row in table_rows()}
    assert rows["GPT-3"]["6ND FLOPs"] == training_flops(175e9, 300e9)
    assert rows["GPT-3"]["reported FLOPs"] == 3.14e23
    assert rows["GPT-NeoX-20B"]["6ND FLOPs"] is None  # data given in bytes, not tokens
    assert rows["GLaM"]["6ND FLOPs"] == training_flops(96.6e9, 280e9)


@pytest.mark.parametrize("call, message", [
    (lambda: training_flops(0, 1e9), "params=0"),
    (lambda: training_days(1e23, 8, "H100", 0.4), "hardware='H100'"),
    (lambda: training_days(1e23, 8, "A100", 1.5), "mfu=1.5"),
    (lambda: training_days(1e23, 0, "A100", 0.4), "chips=0"),
])
def test_bad_arguments_get_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
