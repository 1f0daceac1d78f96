"""The fine-tuning training modules' shared base: the momentum teacher's EMA runs after an optimizer update, never in
the forward, so a batch the engine skips for a non-finite loss leaves the twins as they were."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune.task_module import BackboneTask
from finetune.tasks.entailment import EntailmentModel, EntailmentOptions, attach_head
from finetune.tasks.nlvr2 import HEAD as NLVR_HEAD
from finetune.tasks.nlvr2 import Nlvr2Model, build_head
from finetune.tasks.retrieval import RetrievalModel
from pretrain.models.albef import Albef, AlbefOptions
from pretrain.models.encoders import TextOptions, VisionOptions

M = 0.9  # a momentum far from 1 so one EMA step is plainly visible


def _albef() -> Albef:
    torch.manual_seed(0)
    return Albef(AlbefOptions(
        vision=VisionOptions(name="vit_tiny_patch16_224", kwargs={"depth": 1, "patch_size": 8}),
        text=TextOptions(config={"num_hidden_layers": 2}), image_size=16, embed_dim=16, queue_size=8, momentum=M,
    ))  # fmt: skip


def _entailment() -> tuple[BackboneTask, dict, list[tuple[nn.Parameter, nn.Parameter]]]:
    bb = _albef()
    attach_head(bb)
    model = EntailmentModel(bb, EntailmentOptions())
    batch = {"image": torch.randn(2, 3, 16, 16), "text": ["a red circle", "two blue squares"],
             "label": torch.tensor([0, 2])}  # fmt: skip
    return model, batch, model.distiller.pairs(bb)


def _nlvr2() -> tuple[BackboneTask, dict, list[tuple[nn.Parameter, nn.Parameter]]]:
    bb = _albef()
    bb.add_module(NLVR_HEAD, build_head(bb))
    model = Nlvr2Model(bb, "alternate", distill=True, alpha=0.4, momentum=M)
    batch = {"image": torch.randn(2, 2, 3, 16, 16), "text": ["a red circle", "two blue squares"],
             "label": torch.tensor([0, 1])}  # fmt: skip
    return model, batch, model._pairs()


@pytest.mark.parametrize("build", [_entailment, _nlvr2], ids=["distiller", "own_teacher"])
def test_skipped_step_leaves_twins_and_the_update_is_one_ema_step(build):
    model, batch, pairs = build()
    model.train()
    with torch.no_grad():  # stand-in for an optimizer update: online weights move away from their twins
        for online, _ in pairs:
            online.add_(0.1 * torch.randn_like(online))
    twins_before = [t.detach().clone() for _, t in pairs]
    online_now = [o.detach().clone() for o, _ in pairs]
    assert any(not torch.equal(o, t) for o, t in zip(online_now, twins_before))

    # the engine skips this batch (non-finite loss on some rank): forward ran, no optimizer step, no hook call
    assert torch.isfinite(model(batch)["loss"])
    assert all(torch.equal(t, b) for (_, t), b in zip(pairs, twins_before)), "a forward moved the momentum twins"

    # the replacement batch is stepped: exactly one EMA step, twin = m * twin + (1 - m) * online
    model(batch)
    model.after_optimizer_step()
    for (_, t), b, o in zip(pairs, twins_before, online_now):
        torch.testing.assert_close(t.detach(), M * b + (1 - M) * o)
    # no training forward since: a further hook call (e.g. an eval step) moves nothing
    after = [t.detach().clone() for _, t in pairs]
    model.after_optimizer_step()
    assert all(torch.equal(t, a) for (_, t), a in zip(pairs, after))


def test_eval_forward_never_makes_the_ema_due():
    model, batch, pairs = _entailment()
    model.eval()
    with torch.no_grad():
        for online, _ in pairs:
            online.add_(1.0)
        model(batch)
    before = [t.detach().clone() for _, t in pairs]
    model.after_optimizer_step()
    assert all(torch.equal(t, b) for (_, t), b in zip(pairs, before))


def test_delegation_to_the_backbone():
    bb = _albef()
    model = RetrievalModel(bb)
    assert model.no_weight_decay() == {f"backbone.{n}" for n in bb.no_weight_decay()} and model.no_weight_decay()
    with torch.no_grad():
        bb.temp.fill_(5.0)
    model.after_optimizer_step()  # the backbone's own hook clamps the temperature
    assert float(bb.temp.detach()) <= 0.5
    assert RetrievalModel(nn.Linear(2, 2)).no_weight_decay() == set()


def test_load_head_init_takes_only_the_heads_weights(monkeypatch):
    """``--eval-only`` of a fine-tune run: the head's weights come from ``model.init`` (``backbone.`` prefix or not);
    an init without them is reported (False), no init is None."""
    import pretrain.export
    from finetune.pairs import load_head_init

    bb = nn.Module()
    bb.head = nn.Linear(3, 2)
    saved = nn.Linear(3, 2)
    states = {
        "run": {
            "backbone.other.weight": torch.ones(1),
            **{f"backbone.head.{k}": v for k, v in saved.state_dict().items()},
        },
        "bare": {"other.weight": torch.ones(1)},
    }
    monkeypatch.setattr(pretrain.export, "load_state", lambda init: states[init])
    assert load_head_init(bb, "head", "none") is None and load_head_init(bb, "head", None) is None
    assert load_head_init(bb, "head", "bare") is False
    assert not torch.equal(bb.head.weight, saved.weight)
    assert load_head_init(bb, "head", "run") is True
    assert torch.equal(bb.head.weight, saved.weight) and torch.equal(bb.head.bias, saved.bias)


def test_head_task_gives_the_new_head_its_learning_rate():
    """``task.head_lr_mult`` (ViLT's lr_mult): the head's parameters, and only they, train at ``lr * mult``."""
    from types import SimpleNamespace

    from finetune.tasks.entailment import EntailmentTask

    data = SimpleNamespace(image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    cfg = SimpleNamespace(task=SimpleNamespace(image_root=None, head_lr_mult=10.0), data=data,
                          train=SimpleNamespace(weight_decay=0.02, lr=1e-4))  # fmt: skip
    bb = nn.Module()
    bb.ve_head, bb.encoder = nn.Linear(4, 3), nn.Linear(4, 4)
    model = BackboneTask(bb)
    head_ids = {id(p) for p in bb.ve_head.parameters()}
    groups = EntailmentTask(cfg).param_groups(model)
    assert sum(len(g["params"]) for g in groups) == 4
    for g in groups:
        in_head = {id(p) in head_ids for p in g["params"]}
        assert len(in_head) == 1 and g.get("lr", 1e-4) == pytest.approx(1e-3 if in_head.pop() else 1e-4)
    cfg.task.head_lr_mult = 1.0
    assert EntailmentTask(cfg).param_groups(model) is None
