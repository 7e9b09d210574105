"""The plan's choice: one candidate per layer minimising the total damage under a byte budget
(a multiple-choice knapsack)."""

from __future__ import annotations

import torch

DP_STEPS = 1 << 16  # byte granularity of the knapsack: capacity / 2^16 (costs rounded up to it)


def choose(costs: list, damages: list, capacity: int) -> list:
    """Multiple-choice knapsack: one index per row minimising sum damages[i][k] with
    sum costs[i][k] <= capacity (ints). Exact DP over costs rounded up to a granularity of
    ceil(slack / DP_STEPS) bytes, then greedy upgrades with the bytes left. Deterministic."""
    base = [min(c) for c in costs]
    extra = capacity - sum(base)
    if extra < 0:
        raise ValueError("infeasible budget")
    g = max(1, -(-extra // DP_STEPS))
    U = extra // g
    inf = float("inf")
    dp = torch.zeros(U + 1, dtype=torch.float64)
    picks = []
    for cs, ds, b in zip(costs, damages, base):
        new = torch.full((U + 1,), inf, dtype=torch.float64)
        pick = torch.full((U + 1,), -1, dtype=torch.int32)
        for k, (c, d) in enumerate(zip(cs, ds)):
            u = -(-(c - b) // g)
            if u > U:
                continue
            cand = dp[: U + 1 - u] + d
            better = cand < new[u:]
            new[u:] = torch.where(better, cand, new[u:])
            pick[u:] = torch.where(better, torch.full_like(pick[u:], k), pick[u:])
        dp, _ = new, picks.append(pick)
    j, sel = U, []
    for pick, cs, b in zip(reversed(picks), reversed(costs), reversed(base)):
        k = int(pick[j])
        sel.append(k)
        j -= -(-(cs[k] - b) // g)
    sel.reverse()
    left = capacity - sum(c[k] for c, k in zip(costs, sel))
    while True:  # greedy: the upgrade that removes the most damage per byte, while bytes remain
        best, move = 0.0, None
        for i, (cs, ds) in enumerate(zip(costs, damages)):
            k0 = sel[i]
            for k, (c, d) in enumerate(zip(cs, ds)):
                add, gain = c - cs[k0], ds[k0] - d
                if gain <= 0 or add > left:
                    continue
                rate = inf if add <= 0 else gain / add
                if rate > best:
                    best, move = rate, (i, k, add)
        if move is None:
            break
        i, k, add = move
        sel[i] = k
        left -= add
    return sel
