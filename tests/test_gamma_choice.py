"""The γ choice and its exploration (sglang_er.gamma.choice): engine-free, no SGLang."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from gamma_helpers import accepted_run, chooser_for, crossover, fresh_choice

from sglang_er.gamma import (
    AcceptanceModel,
    CostModel,
    GammaChooser,
)
from sglang_er.gamma.builtin_profiles import builtin_profile


def test_gamma_modules_do_not_import_sglang():
    # The γ choice must be usable (and testable) without the engine, and light to import.
    code = (
        "import sys, sglang_er.gamma, sglang_er.gamma.builtin_profiles, sglang_er.gamma.calibration, "
        "sglang_er.gamma.hardware_profile; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('sglang', 'torch')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_chooser_switches_with_batch_and_hardware(qwen):
    cpu = chooser_for("cpu", qwen, explore_every=0)
    d1 = fresh_choice(cpu, [512])
    assert d1.gamma > 0 and d1.speedup > 1.2
    assert set(d1.predicted_tokens_per_s) == {0, 1, 2, 3, 4} and d1.reason
    assert fresh_choice(cpu, [512] * 256).gamma == 0
    cross_cpu = crossover(cpu, 512)
    h100 = chooser_for("h100", qwen, explore_every=0)
    assert fresh_choice(h100, [512]).gamma > 0
    cross_h100 = crossover(h100, 512)
    assert cross_cpu is not None and cross_h100 is not None
    assert 2 <= cross_cpu < cross_h100
    # speculation at batch cross-1, none at cross
    assert fresh_choice(cpu, [512] * (cross_cpu - 1)).gamma > 0
    assert fresh_choice(cpu, [512] * cross_cpu).gamma == 0
    # acceptance matters: a drafter that is always wrong is never worth running
    assert chooser_for("cpu", qwen, alpha=0.05).choose([512]).gamma == 0


def test_chooser_deterministic_with_hysteresis_gain_and_ladder(qwen):
    lens = [random.Random(4).randint(10, 2000) for _ in range(5)]
    a, b = chooser_for("cpu", qwen), chooser_for("cpu", qwen)
    assert a.choose(lens) == b.choose(lens)
    assert a.choose(lens) == a.choose(lens)

    # Hysteresis: having chosen γ>0, a batch where plain is only slightly better keeps γ
    pol = chooser_for("cpu", qwen, hysteresis=0.5)
    g1 = pol.choose([512]).gamma
    twin = chooser_for("cpu", qwen, hysteresis=0.5, explore_every=0)  # the same models, no memory
    cross = crossover(twin, 512)
    d = fresh_choice(twin, [512] * cross)
    assert d.gamma == 0 and d.predicted_tokens_per_s[0] < 1.5 * d.predicted_tokens_per_s[g1]
    kept = pol.choose([512] * cross)
    assert kept.gamma == g1 and "hysteresis" in kept.reason
    assert pol.choose([512] * 512).gamma == 0  # a large change still switches

    # min_gain: demand a 10× gain -> never speculate
    assert chooser_for("cpu", qwen, min_gain=10.0).choose([512]).gamma == 0
    # the ladder restricts γ
    d = chooser_for("cpu", qwen, ladder=[2]).choose([512])
    assert d.gamma == 2 and set(d.predicted_tokens_per_s) == {0, 2}
    with pytest.raises(ValueError, match="ladder"):
        chooser_for("cpu", qwen, ladder=[1, 8])

    # per-request acceptance feeds the decision
    acc = AcceptanceModel(4, prior_alpha=0.8)
    rng = random.Random(5)
    for _ in range(125):
        acc.observe(4, [accepted_run(rng, [0.8] * 4, 4) for _ in range(8)])
    for _ in range(40):
        acc.observe(4, [0], rids=["bad"])  # a request whose drafts are always rejected
    pol = GammaChooser(CostModel(builtin_profile("cpu"), qwen), acc, explore_every=0)
    assert fresh_choice(pol, [512], ["bad"]).gamma == 0
    assert fresh_choice(pol, [512], ["new"]).gamma > 0


def _python_calls_per_choice(qwen, batch, iterations=20):
    """Python function calls made by each of ``iterations`` consecutive ``choose`` (one batch)."""
    pol = chooser_for("cpu", qwen)
    lens = list(range(100, 100 + batch))
    counts = []

    def profile(frame, event, arg):
        if event == "call":
            counts[-1] += 1

    for _ in range(iterations):
        counts.append(0)
        sys.setprofile(profile)
        try:
            pol.choose(lens)
        finally:
            sys.setprofile(None)
    return counts


def test_chooser_decision_is_cheap(qwen):
    # well under a forward: the batch is summarised by builtins (sum, max over the lengths), then the
    # decision is O(candidates), so the Python work per iteration does not grow with the batch
    # (the counts of two batch sizes differ by a call or two only where exploration branches differ)
    small, large = _python_calls_per_choice(qwen, 16), _python_calls_per_choice(qwen, 1024)
    assert max(large) <= max(small) + 4 and max(large) < 64, (small, large)  # a per-request loop: >= 1024


def test_chooser_explores_when_a_low_acceptance_estimate_keeps_it_plain(qwen):
    """A stale low α would keep γ = 0 for good (no speculation, no new measurement): the 4th
    plain iteration in a batch-size octave where speculation never ran explores, then the
    explore_every-th plain iteration does, the wait doubling after each exploration that left
    plain chosen, up to FORCED_EXPLORE_PERIODS periods; never where clearly compute-bound (there
    only the once-per-octave measurement). A better measured α then turns speculation back on,
    and the wait is explore_every again. An exploration is EXPLORE_RUN speculative iterations in
    a row (the first one runs cold)."""
    from sglang_er.gamma import EXPLORE_RUN, FORCED_EXPLORE_PERIODS

    assert EXPLORE_RUN == 2 and FORCED_EXPLORE_PERIODS == 8
    acc = AcceptanceModel(4, prior_alpha=0.05)  # the estimate after a bad start
    pol = GammaChooser(CostModel(builtin_profile("cpu"), qwen), acc, explore_every=8, explore_floor=0.5)
    picks = [pol.choose([512]).gamma for _ in range(200)]
    explored = [i for i, g in enumerate(picks) if g > 0]
    # waits of 16, 32, 64 plain iterations, then 64 again (the forced period)
    assert explored == [3, 4, 20, 21, 53, 54, 118, 119, 183, 184], picks
    big = [pol.choose([512] * 4096).gamma for _ in range(40)]
    assert sum(g > 0 for g in big) == EXPLORE_RUN, big  # compute-bound: only the octave's one measurement
    for _ in range(64):  # the exploratory iterations measured a good drafter
        acc.observe(4, [4])
    assert pol.choose([512]).gamma > 0
    acc.reset()  # bad again (the prior): plain, explored after explore_every plain iterations
    picks = [pol.choose([512]).gamma for _ in range(30)]
    assert [i for i, g in enumerate(picks) if g > 0] == [7, 8, 24, 25], picks  # waits of 8, then 16
    pol.reset()  # a new drafter: the wait is explore_every again (4 plain iterations already ran)
    picks = [pol.choose([512]).gamma for _ in range(12)]
    assert [i for i, g in enumerate(picks) if g > 0] == [3, 4], picks
    assert (
        GammaChooser(CostModel(builtin_profile("cpu"), qwen), AcceptanceModel(4, prior_alpha=0.05), explore_every=0)
        .choose([512])
        .gamma
        == 0
    )
    acc.reset()  # a new drafter: back to the prior
    assert acc.num_observations == 0 and acc.alphas() == pytest.approx([0.05] * 4)


def test_chooser_times_the_plain_step_while_speculating(qwen):
    """A profile that overestimates the plain step (its fixed overhead measured on a deeper
    model) would keep speculation on for good: while speculating, plain runs after 4 iterations
    until plain has been timed, then every explore_every-th iteration, two in a row (the first
    changes γ and is not timed); the first measurement replaces the profile's guess, and a plain
    step measured fast turns speculation off."""
    cm = CostModel(builtin_profile("cpu"), qwen)
    pol = GammaChooser(cm, AcceptanceModel(4, prior_alpha=0.8), explore_every=8, explore_floor=0.3)
    lens = [512] * 2
    picks = [pol.choose(lens).gamma for _ in range(6)]
    assert picks[:3] == [picks[0]] * 3 and picks[0] > 0 and picks[3:5] == [0, 0] and picks[5] > 0, picks
    cm.observe("plain", lens, 0, 0.2 * cm.t_plain(lens, corrected=False))  # plain is 5x cheaper than thought
    assert cm.correction.multiplier["plain"] == pytest.approx(0.2)
    assert pol.choose(lens).gamma == 0


def test_chooser_measures_again_however_low_its_estimate(qwen):
    """An estimate below the exploration floor (here: acceptance ~0) is still re-measured once
    every FORCED_EXPLORE_PERIODS · explore_every plain iterations, after the batch-size octave's
    first measurement (the 4th plain iteration)."""
    from sglang_er.gamma import FORCED_EXPLORE_PERIODS

    pol = GammaChooser(
        CostModel(builtin_profile("cpu"), qwen),
        AcceptanceModel(4, prior_alpha=0.001),
        explore_every=4,
        explore_floor=0.99,
    )
    n = FORCED_EXPLORE_PERIODS * 4 + 1  # + the exploration's second (timed) iteration
    picks = [pol.choose([512]).gamma for _ in range(3 * n)]
    assert [i for i, g in enumerate(picks) if g > 0] == [3, 4, 3 + n, 4 + n, 3 + 2 * n, 4 + 2 * n], picks


def _simulated_machine(qwen):
    """A machine the built-in CPU profile misprices the way it misprices 2 real CPU cores: its
    target forwards are mostly fixed cost, so widening a verify costs far less than the
    profile's compute rate says (the profile's slope over γ is too steep)."""
    prof = builtin_profile("cpu")
    true = prof.model_copy(
        update={"flops_per_s": {**prof.flops_per_s, "bf16": 6e11}, "fixed_plain_s": 0.12, "fixed_verify_s": 0.125}
    )
    return prof, CostModel(true, qwen)


def _settle(
    pol: GammaChooser, truth: CostModel, batch: int, alpha: float, iterations: int = 300, toll: float = 1.0
) -> list[int]:
    """Run the chooser against ``truth`` as the controller feeds it (phase times ±5%, the first
    speculative iteration after a plain one untimed, accepted lengths drawn at ``alpha``; a plain
    step right after a speculative one costs ``toll`` times its price): γ per iteration."""
    from sglang_er.gamma import BatchStats

    rng, picks = random.Random(0), []
    for i in range(iterations):
        st = BatchStats.uniform(batch, 400 + i)
        g = pol.choose(st).gamma
        if g == 0:
            switched = toll if picks and picks[-1] else 1.0
            phases = {"plain": truth.t_plain(st, corrected=False) * rng.uniform(0.95, 1.05) * switched}
        else:
            phases = {
                "draft": truth.t_draft(st, g, corrected=False) * rng.uniform(0.95, 1.05),
                "verify": truth.t_verify(st, g, corrected=False) * rng.uniform(0.95, 1.05),
            }
            pol.acceptance.observe(g, [accepted_run(rng, [alpha] * g, g) for _ in range(batch)])
        if not (g and picks and picks[-1] == 0):
            for phase, s in phases.items():
                pol.cost_model.observe(phase, st, g, s)
            pol.observe_forwards(st, g, sum(phases.values()))
            pol.observe_outside(g, batch, 0.002 * batch * (1 + g))  # the scheduler's work per committed token
        picks.append(g)
    return picks


def test_a_gamma_not_measured_in_an_octave_is_priced_at_its_measured_neighbours_level(qwen):
    """The correction learnt in one octave misprices another (at 16 requests on 2 CPU cores,
    learnt at 8, every γ was predicted 1.05-1.2x plain and ran 0.8x): once one γ is measured in
    the octave, the others are priced at its measured/raw ratio, not the model's."""
    from sglang_er.gamma import BatchStats

    pol = GammaChooser(CostModel(builtin_profile("cpu"), qwen), AcceptanceModel(8, prior_alpha=0.9), explore_every=0)
    st = BatchStats.uniform(2, 300)
    before = pol.choose(st)
    raw: dict[int, float] = {}
    pol.cost_model.iteration_times(st, list(range(9)), raw)
    pol.measured.observe(2, 2, 3.0 * raw[2], raw[2], pol._iteration)  # γ = 2 ran 3x its raw price
    after = pol.choose(st)
    assert after.predicted_iter_s[3] == pytest.approx(3.0 * raw[3])  # γ = 3 borrows γ = 2's level
    assert after.predicted_iter_s[3] > 2.0 * before.predicted_iter_s[3]
    assert after.predicted_iter_s[0] == pytest.approx(before.predicted_iter_s[0])  # plain borrows nothing
    assert before.gamma > 0 and after.gamma == 0


@pytest.mark.parametrize("batch", [4, 8])
@pytest.mark.parametrize("planted", [False, True])
def test_measured_costs_settle_on_the_best_gamma_where_the_model_slope_is_wrong(qwen, batch, planted):
    """Near the best γ the options differ by less than the model's error in its slope over γ,
    which the per-phase correction, learnt at one γ, does not see. The chooser measures the
    neighbours of the γ it runs and prefers measurements to the model: against a simulated
    machine whose verify widens cheaper than the profile says, it settles within 3% of the
    machine's best γ. Planted: with the measurements ignored it settles on γ = 1-3, 15-20% below."""
    from collections import Counter

    from sglang_er.gamma import BatchStats

    alpha = 0.94
    prof, truth = _simulated_machine(qwen)
    pol = GammaChooser(CostModel(prof, qwen), AcceptanceModel(8, prior_alpha=alpha), min_gain=1.05)
    if planted:
        pol.measured.ratio = lambda *a: None
    picks = _settle(pol, truth, batch, alpha)
    st = BatchStats.uniform(batch, 600)

    def true_tps(g):
        return sum(alpha**k for k in range(g + 1)) / truth.iteration_times(st, [g])[g]

    settled = Counter(picks[-100:]).most_common(1)[0][0]
    best = max(range(9), key=true_tps)
    reached = true_tps(settled) / true_tps(best)
    if planted:
        assert reached < 0.9, (settled, best, reached)
    else:
        assert reached >= 0.97, (settled, best, reached)


@pytest.mark.parametrize("planted", [False, True])
def test_plain_is_measured_while_speculating_not_priced_from_its_first_step(qwen, planted):
    """On 2 CPU cores a plain step right after speculative ones took 125 ms against 105-113 ms
    among plain ones. Priced from such single steps (here 25% dear), plain looks dearer than it is
    and keeps a batch speculating where speculation loses: here after 4 requests (speculation wins) the batch
    grows to 16, where the best γ runs 0.94x plain. A plain exploration runs two steps and the
    second, timed, teaches the correction and is its measured cost: the chooser settles on plain.
    Planted: plain explorations of one step; it speculates in most iterations and reaches under 95%."""
    from sglang_er.gamma import BatchStats

    prof, truth = _simulated_machine(qwen)
    pol = GammaChooser(CostModel(prof, qwen), AcceptanceModel(8, prior_alpha=0.9))
    if planted:
        explore = pol._explore

        def one_step(d, batch):
            e = explore(d, batch)
            if e.gamma == 0 and d.gamma:  # a plain exploration: no second step
                pol._explore_run = 0
            return e

        pol._explore = one_step
    _settle(pol, truth, 4, 0.9, iterations=150, toll=1.25)
    picks = _settle(pol, truth, 16, 0.6, iterations=400, toll=1.25)[-300:]
    st, alpha = BatchStats.uniform(16, 600), 0.6

    def true_tps(g):  # the phases _settle feeds, and its scheduler work per committed token
        forwards = truth.t_plain(st, corrected=False) if g == 0 else truth.t_draft(st, g, corrected=False)
        forwards += truth.t_verify(st, g, corrected=False) if g else 0.0
        return sum(alpha**k for k in range(g + 1)) / (forwards + 0.002 * 16 * (1 + g))

    assert max(true_tps(g) for g in range(1, 9)) < 0.95 * true_tps(0)  # plain is the best
    reached = sum(true_tps(g) for g in picks) / len(picks) / true_tps(0)
    if planted:
        assert reached < 0.95 and sum(g > 0 for g in picks) > 0.5 * len(picks), (reached, picks[-40:])
    else:
        assert reached >= 0.97, (reached, picks[-40:])
