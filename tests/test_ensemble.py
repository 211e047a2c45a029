"""The eq. 5 combination: closed form, true minimiser, monotone EM, batching, and the frozen teacher modules."""
from typing import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ensemble_kd.ensemble import EnsembleTeacher, active_specialists, combine, membership_matrix

D = torch.float64


def ensemble_objective(generalist_probs: Tensor, specialist_probs: Sequence[Tensor], membership: Tensor,
                       active: Tensor, q: Tensor) -> Tensor:
    """L(q) per row, (N,): KL(p_g || q) + sum_{m active} KL(p_m || fold_m(q)) (0 log 0 = 0), written out from
    its definition: what `combine` must minimise."""

    def kl(p: Tensor, r: Tensor) -> Tensor:
        return (torch.xlogy(p, p) - torch.xlogy(p, r)).sum(dim=1)

    total = kl(generalist_probs, q)
    for k, probs in enumerate(specialist_probs):
        classes = membership[k].to(q.device).nonzero().flatten()
        outside_mass = q.masked_fill(membership[k].to(q.device), 0.0).sum(dim=1, keepdim=True)
        folded = torch.cat([q[:, classes], outside_mass], dim=1)
        total = total + torch.where(active[:, k], kl(probs, folded), 0.0)
    return total


def t(rows):
    return torch.tensor(rows, dtype=D)


def closed_form_one_specialist(p_g, p_m, subset):
    """q_c = (p_g,c + p_m,c) / 2 on S; q_c = p_g,c (g_out + p_m,dust) / (2 g_out) off S."""
    in_s = torch.zeros(p_g.shape[1], dtype=torch.bool)
    in_s[subset] = True
    g_out = p_g[:, ~in_s].sum(1, keepdim=True)
    q = p_g * (g_out + p_m[:, -1:]) / (2 * g_out)
    q[:, subset] = (p_g[:, subset] + p_m[:, :-1]) / 2
    return q


def minimise_by_gradient(p_g, specialist_probs, membership, active):
    """Independent solver: L-BFGS on softmax logits of q, started from uniform, float64."""
    z = torch.zeros_like(p_g, requires_grad=True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=2000, tolerance_grad=1e-15, tolerance_change=1e-18,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ensemble_objective(p_g, specialist_probs, membership, active, F.softmax(z, 1)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return F.softmax(z.detach(), 1)


def random_simplex(n, c):
    """n uniform points of the c-class simplex (uses the global torch seed)."""
    return torch.distributions.Dirichlet(torch.ones(c, dtype=D)).sample((n,))


def random_case(n, clusters, num_classes, seed):
    torch.manual_seed(seed)
    p_g = random_simplex(n, num_classes)
    specialist_probs = [random_simplex(n, len(c) + 1) for c in clusters]
    active = torch.rand(n, len(clusters)) < 0.7
    return p_g, specialist_probs, membership_matrix(clusters, num_classes), active


def test_no_active_specialist_returns_generalist_exactly():
    p_g = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    p_m = [torch.tensor([[0.9, 0.1], [float("nan"), float("nan")]])]  # inactive rows are ignored, NaN or not
    active = torch.tensor([[True], [False]])
    q = combine(p_g, p_m, membership_matrix([[0]], 3), active)
    assert torch.equal(q[1], p_g[1])
    assert torch.isfinite(q).all()
    assert not torch.equal(q[0], p_g[0])


def test_one_specialist_hand_example():
    # p_g = (0.5, 0.3, 0.2), S = {0}, p_m = (0.8 | dustbin 0.2). g_out = 0.5:
    # q_0 = (0.5 + 0.8) / 2 = 0.65; q_1 = 0.3 * (0.5 + 0.2) / 1.0 = 0.21; q_2 = 0.2 * 0.7 / 1.0 = 0.14.
    q = combine(t([[0.5, 0.3, 0.2]]), [t([[0.8, 0.2]])], membership_matrix([[0]], 3), torch.tensor([[True]]))
    assert torch.allclose(q, t([[0.65, 0.21, 0.14]]), atol=1e-10)


def test_one_specialist_matches_closed_form_and_grid_minimum():
    p_g = t([[0.15, 0.55, 0.30]])
    p_m = t([[0.6, 0.4]])  # specialist for class 0 thinks class 0 is far more likely
    membership, active = membership_matrix([[0]], 3), torch.tensor([[True]])
    q = combine(p_g, [p_m], membership, active)
    assert torch.allclose(q, closed_form_one_specialist(p_g, p_m, [0]), atol=1e-10)

    # brute force: every point of a 1/600 grid over the 3-class simplex
    steps = 600
    i, j = torch.meshgrid(torch.arange(1, steps, dtype=D), torch.arange(1, steps, dtype=D), indexing="ij")
    keep = (i + j) < steps
    grid = torch.stack([i[keep], j[keep], steps - i[keep] - j[keep]], 1) / steps
    n = len(grid)
    grid_objective = ensemble_objective(p_g.expand(n, 3), [p_m.expand(n, 2)], membership,
                                        active.expand(n, 1), grid)
    q_objective = ensemble_objective(p_g, [p_m], membership, active, q)
    assert q_objective.item() <= grid_objective.min().item() + 1e-12
    assert (grid[grid_objective.argmin()] - q[0]).abs().max() < 2.0 / steps


def test_one_specialist_four_classes_matches_gradient_solver():
    p_g = t([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.15, 0.05]])
    p_m = t([[0.5, 0.2, 0.3], [0.05, 0.05, 0.9]])  # subset [1, 2], in ascending order
    membership, active = membership_matrix([[1, 2]], 4), torch.ones(2, 1, dtype=torch.bool)
    q = combine(p_g, [p_m], membership, active)
    assert torch.allclose(q, closed_form_one_specialist(p_g, p_m, [1, 2]), atol=1e-10)
    assert torch.allclose(q, minimise_by_gradient(p_g, [p_m], membership, active), atol=1e-6)


def test_one_active_specialist_gives_the_closed_form_of_its_cluster():
    p_g, sp, membership, _ = random_case(5, [[0, 1], [1, 2, 3]], 5, seed=1)
    one = torch.tensor([[True, False]] * 5)
    assert torch.allclose(combine(p_g, sp, membership, one), closed_form_one_specialist(p_g, sp[0], [0, 1]),
                          atol=1e-10)


def test_generalist_zero_outside_subset_spreads_dustbin_evenly():
    # g_out = 0: the optimum has Q(outside) = p_dust / 2 = 0.2 and any split of it; EM spreads it evenly
    q = combine(t([[1.0, 0.0, 0.0]]), [t([[0.6, 0.4]])], membership_matrix([[0]], 3), torch.tensor([[True]]))
    assert torch.allclose(q, t([[0.8, 0.1, 0.1]]), atol=1e-9)


def test_two_overlapping_specialists_reach_the_minimum():
    # complements of {0, 1} and {1, 2} are {2, 3} and {0, 3}: they overlap on class 3
    p_g = t([[0.4, 0.3, 0.2, 0.1]])
    sp = [t([[0.2, 0.5, 0.3]]), t([[0.6, 0.1, 0.3]])]
    membership, active = membership_matrix([[0, 1], [1, 2]], 4), torch.ones(1, 2, dtype=torch.bool)
    q = combine(p_g, sp, membership, active, iterations=2000, tolerance=1e-14)
    q_objective = ensemble_objective(p_g, sp, membership, active, q).item()

    torch.manual_seed(0)
    points = random_simplex(20000, 4)
    others = ensemble_objective(p_g.expand(20000, 4), [s.expand(20000, 3) for s in sp], membership,
                                active.expand(20000, 2), points)
    assert q_objective <= others.min().item()

    # KKT: at an interior minimum every partial derivative equals the multiplier -(1 + M) = -3
    q_var = q.clone().requires_grad_(True)
    ensemble_objective(p_g, sp, membership, active, q_var).sum().backward()
    assert torch.allclose(q_var.grad, torch.full_like(q, -3.0), atol=1e-8)
    assert torch.allclose(q, minimise_by_gradient(p_g, sp, membership, active), atol=1e-6)


def test_rows_sum_to_one_float32():
    p_g, sp, membership, active = random_case(64, [[0, 1, 2], [2, 3], [5, 6, 7, 8]], 10, seed=2)
    q = combine(p_g.float(), [s.float() for s in sp], membership, active)
    assert q.dtype == torch.float32
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-6)
    assert (q >= 0).all()


def test_batched_equals_per_row():
    p_g, sp, membership, active = random_case(12, [[0, 1], [1, 2, 3], [4, 5], [0, 6]], 7, seed=3)
    batched = combine(p_g, sp, membership, active)
    for row in range(12):
        alone = combine(p_g[row:row + 1], [s[row:row + 1] for s in sp], membership, active[row:row + 1])
        assert torch.allclose(batched[row:row + 1], alone, atol=1e-14, rtol=0)


def test_em_is_monotone():
    p_g, sp, membership, _ = random_case(8, [[0, 1, 2], [2, 3], [3, 4, 5], [0, 5, 6]], 8, seed=4)
    active = torch.ones(8, 4, dtype=torch.bool)
    objectives = torch.stack([ensemble_objective(p_g, sp, membership, active,
                                                 combine(p_g, sp, membership, active, iterations=i, tolerance=0.0))
                              for i in range(40)])
    increases = objectives[1:] - objectives[:-1]
    assert increases.max() <= 1e-12
    assert (objectives[0] - objectives[-1]).min() > 0  # and it did move every row


def test_active_specialists_top1_and_top2():
    membership = membership_matrix([[0, 1], [2, 3], [3, 4]], 5)
    p_g = torch.tensor([[0.50, 0.10, 0.30, 0.05, 0.05],
                        [0.05, 0.10, 0.15, 0.60, 0.10],
                        [0.02, 0.08, 0.10, 0.30, 0.50]])
    assert active_specialists(p_g, membership, 1).tolist() == [[True, False, False],
                                                                [False, True, True],
                                                                [False, False, True]]
    assert active_specialists(p_g, membership, 2).tolist() == [[True, True, False],
                                                                [False, True, True],
                                                                [False, True, True]]


def test_membership_matrix_and_its_errors():
    assert membership_matrix([[2, 0], [1]], 3).tolist() == [[True, False, True], [False, True, False]]
    with pytest.raises(ValueError, match="outside"):
        membership_matrix([[0, 3]], 3)
    with pytest.raises(ValueError, match="no dustbin"):
        membership_matrix([[0, 1, 2]], 3)
    with pytest.raises(ValueError, match="repeats"):
        membership_matrix([[1, 1]], 3)


def test_combine_rejects_wrong_specialist_width():
    with pytest.raises(ValueError, match=r"\|S\| \+ 1"):
        combine(t([[0.5, 0.3, 0.2]]), [t([[0.5, 0.3, 0.2]])], membership_matrix([[0]], 3), torch.tensor([[True]]))


def make_teacher_parts(seed=0):
    torch.manual_seed(seed)
    generalist = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.5))
    clusters = [[3, 1], [2, 4]]  # class 0 has no specialist; cluster 0 listed out of order on purpose
    specialists = [nn.Sequential(nn.Linear(6, 3), nn.Dropout(0.5)), nn.Linear(6, 3)]
    return generalist, specialists, clusters


def test_teacher_stays_frozen_and_returns_log_probabilities():
    generalist, specialists, clusters = make_teacher_parts()
    teacher = EnsembleTeacher(generalist, specialists, clusters, num_classes=5, top_n=2)
    teacher.train()
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(16, 6)
    log_q = teacher(x)
    assert torch.equal(log_q, teacher(x))  # dropout is off
    assert not log_q.requires_grad and torch.isfinite(log_q).all()
    assert torch.allclose(log_q.exp().sum(1), torch.ones(16), atol=1e-5)
    assert torch.allclose(F.softmax(log_q, 1), teacher.forward_details(x)["q"], atol=1e-6)


def test_teacher_matches_manual_combination_with_reordering_and_shift():
    generalist, specialists, clusters = make_teacher_parts(seed=1)
    shift = [0.7, -0.3]
    teacher = EnsembleTeacher(generalist, specialists, clusters, num_classes=5, top_n=1, dustbin_shift=shift)
    x = torch.randn(32, 6)
    details = teacher.forward_details(x)
    generalist.eval()
    for s in specialists:
        s.eval()
    with torch.no_grad():
        p_g = F.softmax(generalist(x), 1)
        probs = []
        for spec, cluster, extra in zip(specialists, clusters, shift):
            logits = spec(x)
            logits[:, -1] += extra
            order = sorted(range(len(cluster)), key=cluster.__getitem__) + [len(cluster)]
            probs.append(F.softmax(logits, 1)[:, order])  # columns by ascending class id, dustbin last
    membership = membership_matrix([sorted(c) for c in clusters], 5)
    active = active_specialists(p_g, membership, 1)
    assert torch.equal(details["active"], active)
    assert 0 < active.any(1).sum() < 32  # rows whose top class is 0 have no specialist
    assert torch.allclose(details["q"], combine(p_g, probs, membership, active), atol=1e-6)


def test_teacher_rows_without_active_specialist_are_generalist_log_softmax():
    generalist, specialists, clusters = make_teacher_parts(seed=2)
    teacher = EnsembleTeacher(generalist, specialists, clusters, num_classes=5, top_n=1)
    with torch.no_grad():
        generalist[0].bias.copy_(torch.tensor([50.0, 0, 0, 0, 0]))  # class 0 always top-1: nobody is active
    x = torch.randn(4, 6)
    details = teacher.forward_details(x)
    assert not details["active"].any()
    assert torch.equal(teacher(x), F.log_softmax(generalist(x), 1))


def test_teacher_rejects_specialist_of_wrong_width():
    generalist, specialists, clusters = make_teacher_parts()
    specialists[1] = nn.Linear(6, 4)
    teacher = EnsembleTeacher(generalist, specialists, clusters, num_classes=5, top_n=5)
    with pytest.raises(ValueError, match="specialist 1 outputs 4 logits"):
        teacher(torch.randn(3, 6))


