"""The greedy soup of Wortsman et al. (2022, "Model soups", recipe 2): the members ordered by
their own score on held-out data, best first; each is added to the soup only if the soup's
score improves (strictly, as in the paper's code). Unlike the uniform soup, a member that
lands in another basin cannot drag the average down: the first member alone is the floor.

The scores come from the caller (`ensemble.py` evaluates each candidate on the split); this
module only walks the path, so it is tested on plain numbers as well as on runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class SoupStep:
    """One member's turn: its own score, the soup's score with it, and whether it went in."""

    run: str
    alone: float
    soup: float
    added: bool


def greedy_path(
    names: Sequence[str],
    alone: Sequence[float],
    score_of: Callable[[list[int]], float],
    lower_is_better: bool = False,
) -> tuple[list[int], list[SoupStep]]:
    """The indices that make the greedy soup, and the path taken.

    `alone[i]`: member i's own score; `score_of(indices)`: the score of the soup of those
    members (called once per candidate after the first). Ties in `alone` keep the given order.
    """
    sign = -1.0 if lower_is_better else 1.0
    order = sorted(range(len(names)), key=lambda i: -sign * alone[i])
    chosen, best = [order[0]], alone[order[0]]
    steps = [SoupStep(names[order[0]], alone[order[0]], best, True)]
    for index in order[1:]:
        value = score_of([*chosen, index])
        added = sign * value > sign * best  # NaN never improves
        if added:
            chosen, best = [*chosen, index], value
        steps.append(SoupStep(names[index], alone[index], value, added))
    return chosen, steps


def greedy_path_table(path: dict) -> str:
    """A greedy soup's path (`evaluate_ensemble`'s "greedy path") as a markdown table, one row
    per member in the order tried."""
    direction = "lower" if path["lower_is_better"] else "higher"
    lines = [
        f"greedy soup by {path['by']} ({direction} is better), {len(path['ingredients'])} of "
        f"{len(path['steps'])} runs in:",
        "",
        f"| tried | {path['by']} alone | the soup with it | added |",
        "|---|---|---|---|",
    ]
    for step in path["steps"]:
        added = "yes" if step["added"] else "no"
        lines.append(f"| {step['run']} | {step['alone']:.4f} | {step['soup']:.4f} | {added} |")
    return "\n".join(lines) + "\n"
