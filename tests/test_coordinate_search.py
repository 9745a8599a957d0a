"""The released attacker's greedy coordinate search, on toy objectives."""

from __future__ import annotations

import pytest

from mergesec.core.registry import get_op
from mergesec.merging.coordinate_search import (
    RELEASED_GRIDS,
    RELEASED_START,
    coordinate_search,
    normalised_accuracy,
    released_order,
)


def test_the_released_grids_and_order():
    coef = RELEASED_GRIDS["coefficient"]
    assert len(coef) == 99 and coef[0] == 0.1 and coef[-1] == 9.9 and coef[25] == 2.6
    assert RELEASED_GRIDS["k"][0] == 1.0 and RELEASED_GRIDS["k"][-1] == 0.1
    assert RELEASED_GRIDS["drop_rate"][0] == 1e-5 and RELEASED_GRIDS["drop_rate"][-1] == 0.99
    assert released_order(get_op("merge", "dare_ties_released").searchable) == (
        "coefficient", "drop_rate", "k",
    )  # fmt: skip
    assert released_order(get_op("merge", "cart_released").searchable) == (
        "coefficient", "rank_fraction",
    )  # fmt: skip
    assert released_order(get_op("merge", "tsv_released").searchable) == ("coefficient",)


def test_finds_the_optimum_of_a_separable_objective_one_coordinate_at_a_time():
    def objective(s):
        return -((s["coefficient"] - 2.3) ** 2) - (s["k"] - 0.4) ** 2

    res = coordinate_search(objective, order=("coefficient", "k"))
    assert res.best == {"coefficient": 2.3, "k": 0.4}
    assert res.score == pytest.approx(0.0)
    # the coefficient pass ran at the start value of k; the k pass at the chosen coefficient
    assert all(s["k"] == RELEASED_START["k"] for s, _ in res.trials if s["coefficient"] != 2.3)
    assert {s["coefficient"] for s, _ in res.trials[-5:]} == {2.3}


def test_stops_a_pass_after_ten_values_that_do_not_reach_the_best():
    seen = []

    def objective(s):
        seen.append(s["coefficient"])
        return -abs(s["coefficient"] - 1.0)  # best at 1.0, worse for every later value

    res = coordinate_search(objective, order=("coefficient",))
    assert res.best["coefficient"] == 1.0
    assert seen == list(RELEASED_GRIDS["coefficient"][:20])  # 0.1 … 1.0, then 10 misses
    assert len(res.trials) == 20


def test_ties_go_to_the_later_value_and_reset_the_count():
    def objective(s):
        return 1.0 if s["coefficient"] <= 0.5 or s["coefficient"] in (1.5, 2.5) else 0.0

    res = coordinate_search(objective, order=("coefficient",))
    assert res.best["coefficient"] == 2.5  # 1.5 and 2.5 each come within 10 misses of a tie
    assert len(res.trials) == 35  # 0.1 … 2.5, then 10 misses


def test_a_non_monotone_objective_can_stop_before_its_optimum():
    def objective(s):  # a local peak at 0.3, the global one at 5.0 beyond 10 misses
        c = s["coefficient"]
        return {0.3: 0.5, 5.0: 1.0}.get(c, 0.0)

    res = coordinate_search(objective, order=("coefficient",))
    assert res.best["coefficient"] == 0.3 and res.score == 0.5


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        coordinate_search(lambda s: 0.0, order=())
    with pytest.raises(ValueError, match="no start value"):
        coordinate_search(lambda s: 0.0, order=("alpha",))
    with pytest.raises(ValueError, match="patience"):
        coordinate_search(lambda s: 0.0, order=("coefficient",), patience=0)


def test_the_criterion_normalises_by_the_unprotected_experts():
    acc = {"a": 0.5, "b": 0.9}
    clean = {"a": 1.0, "b": 0.9}
    assert normalised_accuracy(acc, clean) == pytest.approx((0.5 + 1.0) / 2)
    assert normalised_accuracy(acc, clean, ["a"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no merged or unprotected accuracy for: c"):
        normalised_accuracy(acc, clean, ["a", "c"])
    with pytest.raises(ValueError, match="> 0"):
        normalised_accuracy(acc, {"a": 0.0, "b": 1.0})
