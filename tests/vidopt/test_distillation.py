"""The distillation objective: labels and the teacher's softened answers, weighed by alpha, at a scale that does not
depend on the temperature."""
import pytest
import torch
import torch.nn.functional as F

from vidopt.distillation import distillation_loss


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(6, 4, generator=torch.Generator().manual_seed(seed))


def test_alpha_one_is_cross_entropy_and_alpha_zero_matches_the_teacher_only():
    student, teacher, labels = _logits(0), _logits(1), torch.tensor([0, 1, 2, 3, 0, 1])
    hard = float(F.cross_entropy(student, labels))
    assert distillation_loss(student, teacher, labels, 1.0, 4.0) == pytest.approx(hard)
    assert float(distillation_loss(teacher, teacher, labels, 0.0, 4.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(student, teacher, labels, 0.0, 4.0)) > 0


def test_the_soft_term_keeps_its_gradient_scale_across_temperatures():
    """T^2 (Hinton et al., 2015): at high temperatures the soft term's gradient is ~(s - t) / N whatever T."""
    teacher, labels = _logits(1), torch.zeros(6, dtype=torch.long)
    norms = []
    for temperature in (8.0, 32.0):
        student = _logits(0).mul(0.01).requires_grad_()
        distillation_loss(student, teacher.mul(0.01), labels, 0.0, temperature).backward()
        norms.append(float(student.grad.norm()))
    assert norms[0] == pytest.approx(norms[1], rel=0.1)
