"""One SGD for both networks: parameter groups, weight decay placement, poly schedule."""

import pytest
import torch
from torch import nn

from cps_hf.optim import build_optimizer, poly_schedule


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1, bias=True),
        nn.GroupNorm(2, 8),
        nn.Conv2d(8, 4, 1),
    )


def test_param_groups_cover_every_parameter_once_without_decay_on_norm_and_bias():
    models = [_net(), _net()]
    optimizer = build_optimizer(models, lr=0.01, weight_decay=4e-4)
    names = [g["name"] for g in optimizer.param_groups]
    assert names == ["model0_decay", "model0_no_decay", "model1_decay", "model1_no_decay"]

    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    every = [id(p) for m in models for p in m.parameters()]
    assert sorted(grouped) == sorted(every) and len(set(grouped)) == len(grouped)

    for index, model in enumerate(models):
        decay = {id(p) for p in optimizer.param_groups[2 * index]["params"]}
        expected_decay = {id(model[0].weight), id(model[3].weight), id(model[5].weight)}  # conv weights only
        assert decay == expected_decay
    for group in optimizer.param_groups:
        assert group["lr"] == 0.01 and group["momentum"] == 0.9
        assert group["weight_decay"] == (0.0 if group["name"].endswith("_no_decay") else 4e-4)


def test_decay_everywhere_when_asked_and_frozen_params_left_out():
    model = _net()
    model[0].weight.requires_grad_(False)
    optimizer = build_optimizer([model], lr=0.1, no_decay_on_norm_and_bias=False)
    assert len(optimizer.param_groups) == 1
    assert len(optimizer.param_groups[0]["params"]) == sum(1 for p in model.parameters() if p.requires_grad)


def test_shared_parameters_are_refused():
    net = _net()
    with pytest.raises(ValueError, match="shared"):
        build_optimizer([net, net], lr=0.1)


def test_poly_schedule_values():
    lr, total = 0.0025, 40
    optimizer = build_optimizer([_net(), _net()], lr=lr)
    scheduler = poly_schedule(optimizer, total_steps=total, power=0.9)
    for t in range(total + 3):
        expected = lr * (1 - t / total) ** 0.9 if t <= total else 0.0
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-18)
        optimizer.step()
        scheduler.step()


def test_one_step_decays_only_the_decay_group():
    torch.manual_seed(0)
    model = _net()
    optimizer = build_optimizer([model], lr=0.1, momentum=0.0, weight_decay=0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradients: only weight decay moves parameters
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (name in {"0.weight", "3.weight", "5.weight"}), name
