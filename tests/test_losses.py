"""kd_loss, fold_probs/fold_labels and the dustbin correction, against hand-worked values."""
import math

import pytest
import torch
import torch.nn.functional as F

from ensemble_kd.losses import (
    DKDLoss,
    KDLoss,
    dkd_loss,
    dustbin_log_correction,
    fit_dustbin_shift,
    fold_labels,
    fold_probs,
    kd_loss,
    kd_loss_from_log_probs,
    teacher_log_probs,
    view_mean_logits,
)

# 2 examples, 3 classes.
STUDENT = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
TEACHER = [[3.0, 2.0, 1.0], [math.log(2.0), 0.0, 0.0]]
LABELS = [2, 0]

# Reference values, worked by hand (stored, as torchdistill's loss tests do):
# CE row 1: -log(e^3 / (e + e^2 + e^3)) = log(1 + e^-1 + e^-2) = 0.40760596; row 2: log 3 = 1.09861229.
CE = 0.7531091265562451  # the mean of the two rows
# KL at T=1, row 1: teacher and student softmaxes are mirror images (a, b, c) and (c, b, a) with
#   log(a / c) = 2, so KL = (a - c) * 2 with a = e^3 / (e + e^2 + e^3), c = e / (e + e^2 + e^3).
# row 2: teacher (1/2, 1/4, 1/4) against uniform: 1/2 log(3/2) + 1/2 log(3/4) = 1/2 log(9/8).
KL_T1 = 0.6046561415185371  # the mean of the two rows
# KL at T=2, row 1: logits halved, log(a / c) = 1.5 - 0.5 = 1, KL = a - c with a, c of softmax(0.5, 1, 1.5).
# row 2: teacher softmax (sqrt2, 1, 1) / (sqrt2 + 2) against uniform: sum of p log(3p).
KL_T2 = 0.1671886303263508  # the mean of the two rows


def tensors(dtype=torch.float64):
    return torch.tensor(STUDENT, dtype=dtype), torch.tensor(TEACHER, dtype=dtype), torch.tensor(LABELS)


def test_alpha_one_is_plain_cross_entropy():
    s, t, y = tensors()
    loss = kd_loss(s, t, y, alpha=1.0, temperature=4.0)
    assert loss.item() == pytest.approx(CE, abs=1e-10)
    assert torch.equal(loss, F.cross_entropy(s, y))


def test_alpha_zero_is_kl_and_needs_no_labels():
    s, t, _ = tensors()
    assert kd_loss(s, t, None, alpha=0.0, temperature=1.0).item() == pytest.approx(KL_T1, abs=1e-10)


def test_temperature_squared_scaling():
    s, t, _ = tensors()
    assert kd_loss(s, t, None, alpha=0.0, temperature=2.0).item() == pytest.approx(4 * KL_T2, abs=1e-10)


def test_alpha_half_mixes_both_terms():
    s, t, y = tensors()
    expected = 0.5 * CE + 0.5 * 4 * KL_T2  # the two terms' weights, and T^2 = 4 on the soft one
    assert kd_loss(s, t, y, alpha=0.5, temperature=2.0).item() == pytest.approx(expected, abs=1e-10)


def test_soft_term_is_zero_when_student_equals_teacher():
    s, _, _ = tensors()
    assert kd_loss(s, s.clone(), None, alpha=0.0, temperature=3.0).item() == pytest.approx(0.0, abs=1e-12)


def test_gradients_reach_the_student_only():
    s, t, y = tensors(torch.float32)
    s.requires_grad_(True)
    t.requires_grad_(True)
    kd_loss(s, t, y, alpha=0.3, temperature=2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("label_kind", ["class ids", "class probabilities"])
def test_the_written_out_gradient_matches_finite_differences(alpha, label_kind):
    torch.manual_seed(0)
    s, t = torch.randn(6, 4, dtype=torch.float64, requires_grad=True), torch.randn(6, 4, dtype=torch.float64)
    mixed = torch.softmax(torch.randn(6, 4, dtype=torch.float64), 1)  # what MixUp / CutMix give
    y = torch.randint(0, 4, (6,)) if label_kind == "class ids" else mixed
    labels = None if alpha == 0 else y
    assert torch.autograd.gradcheck(lambda z: kd_loss(z, t, labels, alpha=alpha, temperature=3.0), (s,))


@pytest.mark.parametrize("temperature", [2.0, 3.0])
def test_kd_loss_in_float64_is_the_chain_of_torch_ops_to_float64_precision(temperature):
    torch.manual_seed(4)
    s = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    t, y, alpha = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 5, (16,)), 0.3
    chain = alpha * F.cross_entropy(s, y) + (1 - alpha) * temperature ** 2 * F.kl_div(
        F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1), log_target=True, reduction="batchmean")
    ours = kd_loss(s, t, y, alpha, temperature)
    (chain_grad,), (ours_grad,) = (torch.autograd.grad(v, s) for v in (chain, ours))
    assert ours.item() == pytest.approx(chain.item(), rel=1e-13)
    assert torch.allclose(ours_grad, chain_grad, rtol=1e-12, atol=1e-16)


def test_class_probabilities_as_labels_give_the_loss_of_their_class_ids_when_one_hot():
    s, t, y = tensors()
    one_hot = F.one_hot(y, s.shape[1]).to(s.dtype)  # what MixUp / CutMix give for a weight of 1
    assert kd_loss(s, t, one_hot, alpha=0.5, temperature=2.0).item() == pytest.approx(
        kd_loss(s, t, y, alpha=0.5, temperature=2.0).item(), abs=1e-12)


def test_kd_loss_rejects_bad_arguments():
    s, t, y = tensors()
    with pytest.raises(ValueError, match="labels are required"):
        kd_loss(s, t, None, alpha=0.5, temperature=2.0)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(s, t, y, alpha=1.5, temperature=2.0)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, t, y, alpha=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(s, t[:, :2], y, alpha=0.5, temperature=2.0)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("label_kind", ["class ids", "class probabilities"])
def test_kd_loss_object_and_its_value_and_grad_give_kd_loss_from_log_probs_value_and_gradient(alpha, label_kind):
    torch.manual_seed(1)
    student = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    teacher = teacher_log_probs(torch.randn(7, 5, dtype=torch.float64), 3.0)
    y = torch.randint(0, 5, (7,)) if label_kind == "class ids" else torch.softmax(torch.randn(7, 5).double(), 1)
    kd = KDLoss(alpha, 3.0)
    ours = kd(student, y, teacher)  # fit's argument order: logits, labels, targets
    reference = kd_loss_from_log_probs(student, teacher, y, alpha, 3.0)
    (ours_grad,), (reference_grad,) = (torch.autograd.grad(v, student) for v in (ours, reference))
    assert ours.item() == reference.item()
    assert torch.equal(ours_grad, reference_grad)
    value, grad = kd.value_and_grad(student, y, teacher)  # what fit trains through
    assert not value.requires_grad and not grad.requires_grad  # fit backpropagates grad from the logits
    assert value.item() == pytest.approx(reference.item(), rel=1e-12)
    assert torch.allclose(grad, reference_grad, rtol=1e-12, atol=1e-15)


def test_kd_loss_value_and_grad_leave_their_inputs_as_they_were():
    teacher = teacher_log_probs(torch.randn(1, 3), 2.0)  # one row: its (C, N) view is already contiguous
    student, kept = torch.randn(1, 3), teacher.clone()
    before = student.clone()
    KDLoss(0.5, 2.0).value_and_grad(student, torch.tensor([1]), teacher)
    assert torch.equal(teacher, kept) and torch.equal(student, before)


def test_kd_loss_object_checks_its_settings_when_made():
    with pytest.raises(ValueError, match="alpha"):
        KDLoss(-0.1, 2.0)
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(0.5, 0.0)


def test_fold_probs_keeps_subset_order_and_sums_the_rest():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    folded = fold_probs(probs, torch.tensor([3, 1]))
    expected = torch.tensor([[0.4, 0.2, 0.4], [0.25, 0.25, 0.5]], dtype=torch.float64)
    assert torch.allclose(folded, expected, atol=1e-15)
    assert torch.allclose(folded.sum(1), torch.ones(2, dtype=torch.float64))


def test_fold_probs_rejects_bad_subsets():
    probs = torch.full((1, 3), 1 / 3)
    with pytest.raises(ValueError, match="repeated"):
        fold_probs(probs, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        fold_probs(probs, torch.tensor([3]))


def test_fold_labels_maps_members_to_positions_and_others_to_dustbin():
    labels = torch.tensor([0, 1, 2, 3, 4, 3])
    assert fold_labels(labels, torch.tensor([3, 1]), num_classes=5).tolist() == [2, 1, 2, 0, 2, 0]


def test_fold_labels_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="index 1"):
        fold_labels(torch.tensor([0, 7]), torch.tensor([1]), num_classes=5)


def test_dustbin_log_correction_values():
    assert dustbin_log_correction(0.1, 0.5) == pytest.approx(math.log(9))
    assert dustbin_log_correction(0.3, 0.3) == pytest.approx(0.0, abs=1e-15)  # no oversampling, no shift
    # ((1 - 0.2) * 0.1) / ((1 - 0.1) * 0.2) = 0.08 / 0.18: undersampled classes push the dustbin down
    assert dustbin_log_correction(0.2, 0.1) == pytest.approx(math.log(4 / 9))


@pytest.mark.parametrize("pi,f", [(0.0, 0.5), (1.0, 0.5), (0.1, 0.0), (0.1, 1.0), (-0.1, 0.5)])
def test_dustbin_log_correction_rejects_shares_outside_open_interval(pi, f):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        dustbin_log_correction(pi, f)


def test_fit_dustbin_shift_matches_the_log_odds_worked_out_by_hand() -> None:
    # two outputs (one class of S, then the dustbin), equal logits: the best shift makes
    # p_dust equal the dustbin share r of the targets, i.e. shift = log(r / (1 - r))
    targets = torch.tensor([1, 1, 1, 0])  # r = 3/4
    shift = fit_dustbin_shift(torch.zeros(4, 2), targets)
    assert shift == pytest.approx(math.log(3.0), abs=1e-6)
    # with a prior already in the logits, only the remainder is added
    shifted = fit_dustbin_shift(torch.tensor([[0.0, 1.0]] * 4), targets)
    assert shifted == pytest.approx(math.log(3.0) - 1.0, abs=1e-6)


def test_fit_dustbin_shift_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="logits must be"):
        fit_dustbin_shift(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))


def test_teacher_log_probs_computed_once_over_cached_views_give_kd_loss_and_its_gradient_bit_for_bit():
    torch.manual_seed(0)
    cached = torch.randn(3, 40, 5) * 4  # (views, N, C) teacher logits, as distill caches them
    once = teacher_log_probs(cached, temperature=2.0)
    idx, labels = torch.tensor([7, 3, 31, 12]), torch.tensor([0, 4, 2, 2])
    student = torch.randn(4, 5, requires_grad=True)
    ours = kd_loss_from_log_probs(student, once[1][idx], labels, alpha=0.5, temperature=2.0)
    (grad_ours,) = torch.autograd.grad(ours, student)
    theirs = kd_loss(student, cached[1][idx], labels, alpha=0.5, temperature=2.0)
    (grad_theirs,) = torch.autograd.grad(theirs, student)
    assert torch.equal(ours, theirs) and torch.equal(grad_ours, grad_theirs)
    with pytest.raises(ValueError, match="temperature"):
        teacher_log_probs(cached, temperature=0.0)


# DKD on one example worked out by hand: student logits (1, 0, -1), teacher logits (0, 2, 1), true class 1, T = 1.
# Teacher p = softmax(0, 2, 1), student q = softmax(1, 0, -1). TCKD = KL((p1, 1 - p1) || (q1, 1 - q1)) = 0.392859;
# NCKD = KL(softmax(0, 1) || softmax(1, -1)) = 1.006842 (the non-target classes, renormalised); CE = -log q1 = 1.407606.
DKD_HAND = dict(student=[[1.0, 0.0, -1.0]], teacher=[[0.0, 2.0, 1.0]], label=[1])


@pytest.mark.parametrize("alpha, beta, expected", [(0.0, 1.0, 0.392859 + 1.006842), (0.0, 8.0, 8.447595),
                                                   (0.5, 8.0, 0.5 * 1.407606 + 0.5 * 8.447595)])
def test_dkd_loss_matches_the_value_worked_out_by_hand(alpha, beta, expected):
    s, t = (torch.tensor(DKD_HAND[k], dtype=torch.float64) for k in ("student", "teacher"))
    loss = dkd_loss(s, torch.tensor(DKD_HAND["label"]), teacher_log_probs(t, 1.0), alpha, 1.0, beta)
    assert float(loss) == pytest.approx(expected, abs=2e-6)


def test_dkd_with_beta_one_minus_the_teachers_true_class_probability_is_hintons_kd():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5, dtype=torch.float64), 3 * torch.randn(6, 5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 1])
    for i in range(6):  # TCKD + (1 - p_t) NCKD = KL(p || q), row by row
        row, label, teacher = s[i:i + 1], labels[i:i + 1], teacher_log_probs(t[i:i + 1], 3.0)
        beta = 1 - float(teacher.exp()[0, label])
        assert float(dkd_loss(row, label, teacher, 0.3, 3.0, beta)) == pytest.approx(
            float(kd_loss(row, t[i:i + 1], label, 0.3, 3.0)), rel=1e-10)


def test_dkd_gradient_reaches_the_student_only_and_is_finite_for_a_certain_teacher():
    s = torch.randn(4, 3, requires_grad=True)
    teacher = teacher_log_probs(torch.tensor([[50.0, -50.0, 0.0]] * 4), 4.0)  # p of the other classes underflows
    loss = DKDLoss(0.5, 4.0, 8.0)(s, torch.tensor([0, 0, 1, 2]), teacher)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_dkd_refuses_mixed_labels_and_bad_settings():
    with pytest.raises(ValueError, match="class ids"):
        dkd_loss(torch.zeros(2, 3), torch.full((2, 3), 1 / 3), torch.log(torch.full((2, 3), 1 / 3)), 0.5, 2.0, 8.0)
    with pytest.raises(ValueError, match="beta"):
        DKDLoss(0.5, 2.0, float("inf"))


def test_view_mean_logits_soften_to_the_mean_of_the_views_distributions():
    # two views of one example, 2 classes, T = 1: softmax(0, 0) = (1/2, 1/2) and softmax(log 3, 0) = (3/4, 1/4);
    # their mean is (5/8, 3/8), so the averaged logits are log(5/8), log(3/8) (up to a shared constant)
    views = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]], dtype=torch.float64)
    mean = view_mean_logits(views, 1.0)
    assert torch.softmax(mean, -1).tolist()[0] == pytest.approx([5 / 8, 3 / 8], abs=1e-7)
    at_two = view_mean_logits(views, 2.0)  # at T = 2 the views are (1/2, 1/2) and (sqrt3, 1) / (sqrt3 + 1)
    expected = (0.5 + 3 ** 0.5 / (3 ** 0.5 + 1)) / 2
    assert torch.softmax(at_two / 2.0, -1)[0, 0].item() == pytest.approx(expected, abs=1e-7)
    assert torch.allclose(view_mean_logits(views[:1], 1.0).softmax(-1), views[0].softmax(-1))  # one view: itself
