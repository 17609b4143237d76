import torch

from backdoor_lab.metrics import AttackSuccessRate


def test_asr_counts_target_hits() -> None:
    metric = AttackSuccessRate()
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    metric.update(logits, torch.tensor([1, 1, 1, 0]))
    assert metric.compute().item() == 0.5


def test_asr_ignores_samples_whose_true_label_is_the_target() -> None:
    metric = AttackSuccessRate()
    preds = torch.tensor([1, 1, 0, 1])
    targets = torch.tensor([1, 1, 1, 1])
    true = torch.tensor([0, 1, 0, 1])  # two samples already of the target class: not attacks
    metric.update(preds, targets, true)
    assert metric.total.item() == 2 and metric.compute().item() == 0.5


def test_asr_all_to_all_is_measured_against_mapped_labels() -> None:
    metric = AttackSuccessRate()
    true = torch.arange(10)
    mapped = (true + 1) % 10
    preds = mapped.clone()
    preds[:3] = true[:3]  # three inputs still get their true label: not successes
    metric.update(preds, mapped, true)
    assert abs(metric.compute().item() - 0.7) < 1e-6


def test_asr_accumulates_and_resets() -> None:
    metric = AttackSuccessRate()
    metric.update(torch.tensor([1]), torch.tensor([1]))
    metric.update(torch.tensor([0, 0, 0]), torch.tensor([1, 1, 1]))
    assert metric.compute().item() == 0.25
    metric.reset()
    metric.update(torch.tensor([1]), torch.tensor([1]))
    assert metric.compute().item() == 1.0
