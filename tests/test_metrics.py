import pytest
import torch

from backdoor_lab.metrics import AttackSuccessRate, attack_counted


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


def test_asr_of_logits_and_of_class_indices_agree_and_shapes_are_checked() -> None:
    logits = torch.tensor([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    from_logits, from_indices = AttackSuccessRate(), AttackSuccessRate()
    from_logits.update(logits, torch.tensor([1, 1, 2]))
    from_indices.update(torch.tensor([1, 0, 2]), torch.tensor([1, 1, 2]))
    assert from_logits.compute().item() == from_indices.compute().item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"preds \(3,\) and attack_targets \(2,\) differ"):
        AttackSuccessRate().update(torch.tensor([1, 0, 2]), torch.tensor([1, 1]))


def test_asr_with_nothing_counted_is_zero_not_nan() -> None:
    metric = AttackSuccessRate()
    metric.update(torch.tensor([1, 1]), torch.tensor([1, 1]), torch.tensor([1, 1]))  # all already the target
    assert metric.total.item() == 0 and metric.compute().item() == 0.0


def test_asr_states_add_up_across_processes() -> None:
    """Hits and totals are summed (dist_reduce_fx="sum"), so the merged rate is the pooled one, not a mean."""
    first, second = AttackSuccessRate(), AttackSuccessRate()
    first.update(torch.tensor([1]), torch.tensor([1]))  # 1 of 1
    second.update(torch.tensor([0, 0, 1]), torch.tensor([1, 1, 1]))  # 1 of 3
    first.merge_state(second)
    assert (first.hits.item(), first.total.item()) == (2, 4) and first.compute().item() == 0.5
    assert AttackSuccessRate.higher_is_better is False  # for the defender, and for any monitor of it


def test_attack_counted_leaves_out_samples_already_of_the_target() -> None:
    targets = torch.tensor([3, 3, 1, 1])
    assert attack_counted(targets, torch.tensor([3, 0, 1, 2])).tolist() == [False, True, False, True]
    assert attack_counted(targets, None).tolist() == [True] * 4
