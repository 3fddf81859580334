import torch
from fusion_example import Median, MedianConfig

from fusion_core import KernelContext
from fusion_core.cli.main import main


def test_median_of_three_ignores_the_outlier():
    a, b, c = torch.tensor([1.0, 5.0]), torch.tensor([2.0, 6.0]), torch.tensor([100.0, -50.0])
    out = Median(MedianConfig()).kernel("w", None, [a, b, c], KernelContext(name="w"))
    assert torch.equal(out, torch.tensor([2.0, 5.0]))


def test_median_of_task_vectors_adds_base():
    base = torch.tensor([10.0])
    out = Median(MedianConfig(use_base=True)).kernel("w", base, [base + 1, base + 3, base - 7], KernelContext(name="w"))
    assert torch.equal(out, torch.tensor([11.0]))


def test_plugin_is_installed(capsys):
    assert main(["plugins", "--json"]) == 0
    assert '"example"' in capsys.readouterr().out
