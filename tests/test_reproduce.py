import json

import pytest
from rich.console import Console

from femeta import reproduce
from femeta.reproduce import PAPER_TABLE3, SETUPS, TEST_TOLERANCES, table3_grid


def fake_results(setups):
    """Table 3 results with a distinct mean per set-up (recommended 1, paper 2, base 3)."""
    value = {"recommended": 1.0, "paper": 2.0, None: 3.0}
    rows = [
        row | {"mean": [value[row["setup"]]] * 4, "std": [0.1] * 4,
               "convergence_ratio": [1.0] * 4, "iterations_at_1e-6": [3] * 10,
               "paper": list(PAPER_TABLE3[(row["p"], row["label"])]), "seconds": 1.0}
        for row in table3_grid(setups)
    ]  # fmt: skip
    return {"epochs": dict.fromkeys(setups, 7), "seed": 0,
            "test_tolerances": list(TEST_TOLERANCES), "rows": rows}  # fmt: skip


def test_table3_grid_has_base_once_and_each_set_up_trained():
    assert len(table3_grid()) == 20
    both = table3_grid(SETUPS)
    assert len(both) == 2 + 2 * 18
    assert sum(row["loss"] is None for row in both) == 2
    assert {row["setup"] for row in both if row["loss"]} == set(SETUPS)
    with pytest.raises(ValueError, match="unknown Table 3 set-ups"):
        table3_grid(("mine",))


def test_table3_shows_both_set_ups_beside_the_papers_numbers():
    console = Console(width=200, record=True)
    console.print(reproduce.table3_rich(fake_results(SETUPS)))
    text = console.export_text()
    assert "default / --paper (paper's)" in text
    assert "1.00 / 2.00 (36.11)" in text  # p = 0.01, eps = 1e-6
    assert "3.00 (164.41)" in text and "3.00 / " not in text


def test_table3_figures_are_drawn_from_the_default_set_up(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(reproduce, "save_figure", lambda figure, path: drawn.append(figure))
    reproduce.save_table3(fake_results(SETUPS), tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == 38 and len(drawn) == 2
    heights = {round(bar.get_height(), 6) for bar in drawn[0].axes[0].patches}
    assert heights == {1.0}  # the recommended runs', not the paper set-up's (2.0)


def test_epochs_budgets_of_the_set_ups():
    assert reproduce.epochs_budget("table3", False, None) == 700
    assert reproduce.epochs_budget("table3", True, None) == 50
    assert reproduce.epochs_budget("table3-paper", False, None) == 2500
    assert reproduce.epochs_budget("table3-paper", True, 3) == 3
