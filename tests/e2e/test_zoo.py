"""The Hugging Face family zoo (tests/e2e/zoo.py): each family compiled straight from
`transformers` (tiny config, random weights, float64, eval mode) and trained three SGD
(momentum) steps against PyTorch eager (tests/reference.py): the losses, every parameter and
buffer, and frozen parameters left bitwise unchanged.

By default the families of `zoo.DEFAULT` (one per mechanism) run under the combined scheme
(ratio rules on two weight matrices, every bias and every normalization weight); `--zoo-full`
runs every family under "full", "norms-biases", "partial" and "combined". Known gaps
(zoo.FAILS) are strict xfails, and the families torch.export cannot trace (zoo.NOT_EXPORTABLE)
must still fail to export as recorded: a case that starts passing is a gap closed, to move
back into the zoo.
"""
import copy
import re

import pytest
import torch

import edgetune as et
from edgetune.compiler.frontend.torch import _WithLoss
from tests.e2e import zoo
from tests.reference import assert_models_match, train_eager

pytest.importorskip("transformers")

LR, MOMENTUM = 0.1, 0.9
DEFAULT_SCHEME = "combined"


def cases():
    for name in zoo.FAMILIES:
        if name in zoo.NOT_EXPORTABLE:
            continue
        for scheme in zoo.SCHEMES:
            marks = [] if scheme == DEFAULT_SCHEME and name in zoo.DEFAULT else [pytest.mark.zoo_full]
            gap = zoo.FAILS.get((name, scheme)) or zoo.FAILS.get((name, "*"))
            if gap is not None:
                marks.append(pytest.mark.xfail(strict=True, raises=gap.raises, reason=gap.reason))
            yield pytest.param(name, scheme, marks=marks, id=f"{name}-{scheme}")


@pytest.mark.parametrize("name, scheme", list(cases()))
def test_family_matches_eager(name, scheme):
    family = zoo.FAMILIES[name]
    model, loss_fn, batches = family.build()
    reference = copy.deepcopy(model)
    family.reference_setup(reference)
    trainer = et.compile(model, loss_fn, *batches[0], scheme=zoo.schemes(family, model)[scheme],
                         optimizer=et.SGD(lr=LR, momentum=MOMENTUM))
    masks = trainer.trained_masks()
    losses = [trainer.step(*batch) for batch in batches]
    assert len(set(losses)) > 1, "the model's output does not depend on its input: the comparison checks nothing"
    want = train_eager(reference, loss_fn, batches, masks, lambda ps: torch.optim.SGD(ps, lr=LR, momentum=MOMENTUM))
    assert losses == pytest.approx(want, rel=family.rtol)
    assert_models_match(model, reference, rtol=family.rtol, atol=family.rtol / 10)
    trained = dict(model.named_parameters())
    for pname, ref in reference.named_parameters():
        if pname not in masks:
            assert torch.equal(trained[pname], ref), f"{pname} is frozen but changed"


@pytest.mark.parametrize("name", sorted(zoo.NOT_EXPORTABLE))
def test_family_still_not_exportable(name):
    family = zoo.FAMILIES[name]
    model, loss_fn, batches = family.build()
    inputs, targets = batches[0]
    with pytest.raises(Exception, match=re.escape(zoo.NOT_EXPORTABLE[name])):
        torch.export.export(_WithLoss(model, loss_fn, len(inputs)), tuple(inputs) + tuple(targets), strict=False)

