"""LSTM and GRU layers as one op (edgetune/compiler/ir/ops/recurrent.py, gru.py): the looped
kernels in float64 against autograd, oneDNN's LSTM and the GRU loop in float32 against eager
nn.LSTM / nn.GRU step by step, and which calls the frontend keeps whole."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import edgetune as et
from edgetune.compiler.frontend.torch import export
from tests.ops.harness import check_grads, t
from tests.reference import assert_models_match, train_eager


def _rnn(kind, num_layers=1, bidirectional=False, batch_first=False, has_biases=True):
    """torch.lstm (torch.gru, torch.rnn_tanh, torch.rnn_relu) with its initial states and weights
    as separate arguments, for check_grads: the outputs and the last states, flat."""
    states = 2 if kind == "lstm" else 1

    def fn(x, *rest):
        first, params = rest[:states], rest[states:]
        op = {"lstm": torch.lstm, "gru": torch.gru, "rnn-tanh": torch.rnn_tanh, "rnn-relu": torch.rnn_relu}[kind]
        out, *last = op(x, first if kind == "lstm" else first[0], params, has_biases, num_layers, 0.0, True,
                        bidirectional, batch_first)
        return torch.cat([out.reshape(-1), *(s.reshape(-1) for s in last)])
    return fn


def _weights(input_size, hidden, num_layers=1, directions=1, has_biases=True, gates=4, proj=0):
    """A layer's weights and biases for each layer and direction (4 gates: an LSTM's; 3: a GRU's),
    and an LSTM's projection [proj, hidden] where `proj`."""
    params, out = [], proj or hidden
    for layer in range(num_layers):
        for _ in range(directions):
            width = input_size if layer == 0 else out * directions
            params += [t(gates * hidden, width), t(gates * hidden, out)] + (
                [t(gates * hidden), t(gates * hidden)] if has_biases else []) + ([t(proj, hidden)] if proj else [])
    return params


@pytest.mark.parametrize("kind", ["lstm", "gru", "lstm-proj", "rnn-tanh", "rnn-relu"])
@pytest.mark.parametrize("num_layers,bidirectional,batch_first,has_biases", [
    (1, False, False, True), (1, True, True, True), (2, False, True, False), (2, True, False, True)])
def test_recurrent_gradients_against_autograd(kind, num_layers, bidirectional, batch_first, has_biases):
    """Every input's gradient, the initial states' included, through the outputs and the last
    states (h and c of an LSTM, h of a GRU or an RNN); lstm-proj: an LSTM with proj_size 2 (h 2
    wide, c 4)."""
    directions, proj = (2 if bidirectional else 1), (2 if kind == "lstm-proj" else 0)
    x = t(2, 5, 3) if batch_first else t(5, 2, 3)
    states = [t(num_layers * directions, 2, width) for width in ([proj or 4, 4] if kind.startswith("lstm") else [4])]
    gates = {"lstm": 4, "lstm-proj": 4, "gru": 3}.get(kind, 1)
    check_grads(_rnn(kind.removesuffix("-proj"), num_layers, bidirectional, batch_first, has_biases), x, *states,
                *_weights(3, 4, num_layers, directions, has_biases, gates=gates, proj=proj))


@pytest.mark.parametrize("reverse", [False, True])
def test_the_kept_workspace_gives_the_gradients_of_a_forward_run_again(reverse):
    """oneDNN's backward from the workspace the forward attached, and from a second forward
    (a value without it: a copy of the output): the same bits."""
    from edgetune.compiler.ir.ops.recurrent import WORKSPACE, _lstm_layer, _lstm_layer_grad, workspace_bytes

    g = torch.Generator().manual_seed(0)
    x, h0, c0 = (torch.randn(shape, generator=g) for shape in ((6, 3, 5), (3, 7), (3, 7)))
    weights = [torch.randn(shape, generator=g) for shape in ((28, 5), (28, 7), (28,), (28,))]
    size = workspace_bytes(x, weights[1], reverse)
    assert size > 0
    packed = _lstm_layer(x, h0, c0, *weights, reverse=reverse, workspace=size)
    assert getattr(packed, WORKSPACE).nbytes == size and not hasattr(packed.clone(), WORKSPACE)
    assert torch.equal(packed, _lstm_layer(x, h0, c0, *weights, reverse=reverse))
    grad_out = torch.randn(packed.shape, generator=g)
    kept = _lstm_layer_grad(grad_out, packed, x, h0, c0, *weights, reverse=reverse)
    again = _lstm_layer_grad(grad_out, packed.clone(), x, h0, c0, *weights, reverse=reverse)
    assert torch.equal(kept, again)


def _ops_of(model, x):
    graph = export(model, lambda out: out[0].sum() + out[1][0].sum(), (x,), ()).graph
    return {n.op for n in graph.nodes}


def test_the_frontend_keeps_an_lstm_whole_where_the_op_applies():
    x = torch.randn(5, 2, 3)
    assert "lstm_layer" in _ops_of(nn.LSTM(3, 4, num_layers=2, bidirectional=True), x)
    assert "lstm_layer" in _ops_of(nn.LSTM(3, 4, num_layers=2, dropout=0.5).eval(), x)
    assert _ops_of(nn.LSTM(3, 4, num_layers=2, proj_size=2, bias=False), x) >= {"lstm_proj_layer"}
    # dropout between layers in train mode: a call a layer, the dropout between them
    assert {"lstm_layer", "dropout_mask"} <= _ops_of(nn.LSTM(3, 4, num_layers=2, dropout=0.5).train(), x)
    assert {"lstm_proj_layer", "dropout_mask"} <= _ops_of(nn.LSTM(3, 4, num_layers=2, dropout=0.5, proj_size=2).train(), x)
    # bfloat16: torch's decomposition, step by step
    assert "lstm_layer" not in _ops_of(nn.LSTM(3, 4).to(torch.bfloat16), x.to(torch.bfloat16))


class _TwoLSTMs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fused, self.decomposed = nn.LSTM(3, 4), nn.LSTM(4, 4, num_layers=2).to(torch.bfloat16)

    def forward(self, x):
        return self.decomposed(self.fused(x)[0].to(torch.bfloat16))


def test_each_lstm_call_stays_whole_or_is_decomposed_on_its_own():
    """An LSTM that the op cannot stand for (bfloat16) leaves the model's other LSTM whole."""
    ops = _ops_of(_TwoLSTMs(), torch.randn(5, 2, 3))
    assert "lstm_layer" in ops and "sigmoid" in ops


class _Stacked(nn.Module):
    def __init__(self, kind, **rnn):
        super().__init__()
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind](3, 4, num_layers=3, **rnn)
        self.head = nn.Linear((rnn.get("proj_size") or 4) * (2 if rnn.get("bidirectional") else 1), 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][-1])


@pytest.mark.parametrize("kind, rnn", [("lstm", dict(bidirectional=True)), ("lstm", dict(proj_size=2)),
                                       ("gru", dict()), ("rnn", dict(nonlinearity="relu"))],
                         ids=["lstm-bidirectional", "lstm-proj", "gru", "rnn-relu"])
def test_dropout_between_recurrent_layers_in_train_mode_is_applied(kind, rnn):
    """p = 1 drops every layer's output but the last (eager's layers below it get no gradient):
    three SGD steps as eager's, parameter by parameter. p = 0.5: the loss changes from step to step
    though nothing trains (lr 0), as eager's does."""
    torch.manual_seed(0)
    model = _Stacked(kind, dropout=1.0, **rnn).train()
    reference, first_layer = copy.deepcopy(model), model.rnn.weight_ih_l0.detach().clone()
    g = torch.Generator().manual_seed(1)
    batches = [((torch.randn(5, 3, 3, generator=g),), (torch.randint(0, 2, (3,), generator=g),)) for _ in range(3)]
    trainer = et.compile(model, F.cross_entropy, *batches[0], optimizer=et.SGD(lr=0.1, momentum=0.9))
    assert sum(n.op.endswith("_layer") for n in trainer.graph.nodes) == 3 * (2 if rnn.get("bidirectional") else 1)
    _assert_trains_as_eager(trainer, model, reference, batches, _sgd_momentum, rtol=1e-5)
    assert torch.equal(model.rnn.weight_ih_l0.detach(), first_layer)  # its output never reaches the loss

    half = _Stacked(kind, dropout=0.5, **rnn).train()
    trainer = et.compile(half, F.cross_entropy, *batches[0], optimizer=et.SGD(lr=0.0))
    losses = {trainer.step(*batches[0]) for _ in range(6)}
    assert len(losses) > 1


class _Tagger(nn.Module):
    """Embedding -> LSTM (GRU) -> a head on each token's output and on the last state(s): every
    output of the layer reaches the loss."""

    def __init__(self, kind="lstm", **rnn):
        super().__init__()
        self.emb = nn.Embedding(50, 6)
        setattr(self, kind, {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind](6, 8, batch_first=True, **rnn))
        self.kind = kind
        out = rnn.get("proj_size") or 8  # an LSTM's h is proj_size wide, its c 8
        self.head = nn.Linear(out * (2 if rnn.get("bidirectional") else 1), 5)
        self.last = nn.Linear(8, 5)
        if kind == "lstm":
            self.last_h = nn.Linear(out, 5)

    def forward(self, ids):
        out, state = getattr(self, self.kind)(self.emb(ids))
        last = self.last_h(state[0][-1]) + self.last(state[1][0]) if self.kind == "lstm" else self.last(state[-1] + state[0])
        return self.head(out).mean(1) + last


def _batches(n=3):
    g = torch.Generator().manual_seed(3)
    return [((torch.randint(0, 50, (4, 7), generator=g),), (torch.randint(0, 5, (4,), generator=g),)) for _ in range(n)]


@pytest.mark.parametrize("lstm,scheme", [
    (dict(), {"*": "full"}),
    (dict(num_layers=2, bidirectional=True), {"*": "full"}),
    (dict(num_layers=2), {"lstm.*bias*": "full", "head.*": "full"}),
    (dict(bias=False), {"lstm.weight_hh_l0": 0.5, "last.*": "full"}),
], ids=["one-layer-full", "two-layer-bidirectional-full", "biases", "no-bias-partial-channels"])
def test_lstm_models_train_as_eager_does(lstm, scheme):
    """oneDNN's kernels (float32), three SGD steps: parameters and losses as eager's."""
    torch.manual_seed(0)
    model = _Tagger(**lstm)
    reference = copy.deepcopy(model)
    batches = _batches()
    trainer = et.compile(model, F.cross_entropy, *batches[0], scheme=scheme, optimizer=et.SGD(lr=0.1, momentum=0.9))
    assert any(n.op == "lstm_layer" for n in trainer.graph.nodes)
    _assert_trains_as_eager(trainer, model, reference, batches, _sgd_momentum, rtol=1e-5)


def test_without_onednn_the_loop_trains_an_lstm_as_eager_does(monkeypatch):
    """A torch build whose oneDNN has no LSTM kernel: the float32 step loops over the steps."""
    from edgetune.compiler.ir.ops import recurrent

    monkeypatch.setattr(recurrent, "_onednn_runs_lstm", lambda: False)
    torch.manual_seed(0)
    model = _Tagger(bidirectional=True)
    reference = copy.deepcopy(model)
    batches = _batches()
    trainer = et.compile(model, F.cross_entropy, *batches[0], optimizer=et.SGD(lr=0.1, momentum=0.9))
    assert not any(n.attrs.get("workspace") for n in trainer.graph.nodes if n.op == "lstm_layer")
    _assert_trains_as_eager(trainer, model, reference, batches, _sgd_momentum, masks=_every_parameter(reference),
                            rtol=1e-4)


@pytest.mark.parametrize("kind,rnn", [("lstm", {}), ("gru", {}), ("lstm", dict(proj_size=3)), ("rnn", {}),
                                      ("rnn", dict(nonlinearity="relu"))],
                         ids=["lstm", "gru", "lstm-proj", "rnn-tanh", "rnn-relu"])
def test_a_recurrent_step_runs_on_onnxruntime_as_eager_does(kind, rnn):
    """The exported step: ONNX's LSTM (GRU) op forward, the backward step by step (a projected
    LSTM: forward too, ONNX's LSTM has no projection)."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _Tagger(kind, bidirectional=True, **rnn)
    reference = copy.deepcopy(model)
    batches = _batches()
    trainer = et.compile(model, F.cross_entropy, *batches[0], optimizer=et.SGD(lr=0.1, momentum=0.9),
                         backend="onnxruntime")
    _assert_trains_as_eager(trainer, model, reference, batches, _sgd_momentum, masks=_every_parameter(reference),
                            rtol=1e-4)


def _sgd_momentum(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _every_parameter(model):
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters()}


def _assert_trains_as_eager(trainer, model, reference, batches, optimizer, masks=None, rtol=1e-4):
    """The trainer's steps over `batches` against eager's (`optimizer(params)`) on `reference`:
    the losses, then every parameter. `masks`: what eager trains, by default the trainer's updates."""
    got = [trainer.step(*b) for b in batches]
    masks = masks or {u.name: _mask_of(reference, u) for u in trainer.updates}
    want = train_eager(reference, F.cross_entropy, batches, masks, optimizer)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    assert_models_match(model, reference, rtol=rtol, atol=1e-6)


def _mask_of(model, update):
    p = dict(model.named_parameters())[update.name]
    if update.part is None:
        return torch.ones_like(p, dtype=torch.bool)
    mask = torch.zeros(p.shape[update.part.axis], dtype=torch.bool)
    mask[update.part.index.attrs["value"]] = True
    return mask.reshape([-1 if k == update.part.axis else 1 for k in range(p.dim())])


class _Projected(nn.Module):
    """An LSTM with a projection (lstm_proj_layer) after one without (lstm_layer), batch-second,
    on a state the caller passes."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 6)
        self.first = nn.LSTM(6, 8)
        self.second = nn.LSTM(8, 8, proj_size=4)
        self.head = nn.Linear(4, 5)

    def forward(self, ids, h0, c0):
        out, _ = self.first(self.emb(ids).transpose(0, 1), (h0, c0))
        out, _ = self.second(out)
        return self.head(out[-1])


@pytest.mark.parametrize("model_class", [_Projected, _Tagger], ids=["plain-and-projected", "plain"])
def test_the_gradient_through_a_frozen_lstm_trains_what_is_before_it_as_eager(model_class):
    """The embedding's gradient goes back through the LSTMs, which learn nothing themselves."""
    torch.manual_seed(0)
    model = model_class()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(4)
    state = (torch.randn(1, 4, 8, generator=g), torch.randn(1, 4, 8, generator=g)) if model_class is _Projected else ()
    batches = [((ids, *state), (labels,)) for ids, labels in
               ((torch.randint(0, 50, (4, 7), generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(3))]
    scheme = {"emb.*": "full", "head.*": "full"}
    trainer = et.compile(model, F.cross_entropy, *batches[0], scheme=scheme, optimizer=et.AdamW(lr=0.01))
    # one op a layer, forward and backward; the frozen weights' gradients are not computed
    layers = ["lstm_layer", "lstm_proj_layer", "lstm_proj_layer_grad"] if model_class is _Projected else ["lstm_layer"]
    assert sorted(n.op for n in trainer.graph.nodes if n.op.startswith("lstm")) == sorted(layers + ["lstm_layer_grad"])
    assert all(n.attrs["wanted"] == (True,) + (False,) * 7 for n in trainer.graph.nodes if n.op == "lstm_proj_layer_grad")
    _assert_trains_as_eager(trainer, model, reference, batches, lambda ps: torch.optim.AdamW(ps, lr=0.01), rtol=1e-4)


def test_an_lstm_step_compiles_again_for_another_sequence_length():
    torch.manual_seed(0)
    model = _Tagger()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    batches = [((torch.randint(0, 50, (4, length), generator=g),), (torch.randint(0, 5, (4,), generator=g),))
               for length in (7, 11, 7)]
    trainer = et.compile(model, F.cross_entropy, *batches[0], optimizer=et.SGD(lr=0.1), max_shapes=2)
    _assert_trains_as_eager(trainer, model, reference, batches, lambda ps: torch.optim.SGD(ps, lr=0.1),
                            masks=_every_parameter(reference), rtol=1e-5)


# -- GRU (edgetune/compiler/ir/ops/gru.py) --

@pytest.mark.parametrize("reverse", [False, True])
def test_a_gru_backward_from_the_kept_gates_equals_one_that_runs_the_forward_again(reverse):
    from edgetune.compiler.ir.ops.gru import _gru_layer, _gru_layer_grad, workspace_bytes
    from edgetune.compiler.ir.ops.recurrent import WORKSPACE

    g = torch.Generator().manual_seed(0)
    x, h0 = torch.randn(6, 3, 5, generator=g), torch.randn(3, 7, generator=g)
    weights = [torch.randn(shape, generator=g) for shape in ((21, 5), (21, 7), (21,), (21,))]
    size = workspace_bytes(x, weights[1])
    packed = _gru_layer(x, h0, *weights, reverse=reverse, workspace=size)
    assert getattr(packed, WORKSPACE).nbytes == size and not hasattr(packed.clone(), WORKSPACE)
    # without a backward to follow, the forward is ATen's GRU: the same values, rounded its way
    torch.testing.assert_close(packed, _gru_layer(x, h0, *weights, reverse=reverse), rtol=1e-5, atol=1e-6)
    grad_out = torch.randn(packed.shape, generator=g)
    kept = _gru_layer_grad(grad_out, packed, x, h0, *weights, reverse=reverse)
    assert torch.equal(kept, _gru_layer_grad(grad_out, packed.clone(), x, h0, *weights, reverse=reverse))


def test_a_gru_backward_computes_the_wanted_gradients_only():
    """A gru_layer_grad's buffer holds the gradients its `wanted` names, one after the other,
    each equal to the same gradient of the backward that computes them all."""
    from edgetune.compiler.ir.ops.gru import _gru_layer, _gru_layer_grad
    from edgetune.compiler.ir.ops.recurrent import wanted_parts

    torch.manual_seed(0)
    x, h0 = torch.randn(5, 2, 3), torch.randn(2, 4)
    weights = [torch.randn(12, 3), torch.randn(12, 4), torch.randn(12), torch.randn(12)]
    packed = _gru_layer(x, h0, *weights, reverse=False)
    grad_out = torch.randn(packed.numel())
    inputs = (x, h0, *weights)
    every = wanted_parts(_gru_layer_grad(grad_out, packed, x, h0, *weights, reverse=False), inputs, (True,) * 6)
    for wanted in [(True, False, False, False, True, True), (False, False, True, True, False, False),
                   (False, True, False, False, False, True)]:
        out = _gru_layer_grad(grad_out, packed, x, h0, *weights, reverse=False, wanted=wanted)
        assert out.numel() == sum(t.numel() for t, w in zip(every, wanted) if w)
        for got, full in zip(wanted_parts(out, inputs, wanted), every):
            assert (got is None) or torch.equal(got, full)
        assert [got is not None for got in wanted_parts(out, inputs, wanted)] == list(wanted)


def test_the_frontend_keeps_a_gru_whole_where_the_op_applies():
    x = torch.randn(5, 2, 3)
    assert "gru_layer" in _ops_of(nn.GRU(3, 4, num_layers=2, bidirectional=True), x)
    assert "gru_layer" in _ops_of(nn.GRU(3, 4, num_layers=2, dropout=0.5).eval(), x)
    assert {"gru_layer", "dropout_mask"} <= _ops_of(nn.GRU(3, 4, num_layers=2, dropout=0.5).train(), x)
    assert "gru_layer" not in _ops_of(nn.GRU(3, 4).to(torch.bfloat16), x.to(torch.bfloat16))


@pytest.mark.parametrize("gru,scheme", [
    (dict(), {"*": "full"}),
    (dict(num_layers=2, bidirectional=True), {"*": "full"}),
    (dict(num_layers=2), {"gru.*bias*": "full", "head.*": "full"}),
    (dict(bias=False), {"gru.weight_hh_l0": 0.5, "gru.weight_ih_l0": 0.5, "last.*": "full"}),
    (dict(bidirectional=True), {"head.*": "full", "last.*": "full"}),
], ids=["one-layer-full", "two-layer-bidirectional-full", "biases", "no-bias-partial-channels", "frozen"])
def test_gru_models_train_as_eager_does(gru, scheme):
    _assert_looped_layers_train_as_eager("gru", "gru_layer", scheme, **gru)


def _assert_looped_layers_train_as_eager(kind, op, scheme, **options):
    """Three SGD steps: parameters and losses as eager's. A layer `op` with a backward to follow
    runs edgetune's loop and keeps what its backward reads; a frozen one ATen's kernel (no
    workspace)."""
    torch.manual_seed(0)
    model = _Tagger(kind, **options)
    reference = copy.deepcopy(model)
    batches = _batches()
    trainer = et.compile(model, F.cross_entropy, *batches[0], scheme=scheme, optimizer=et.SGD(lr=0.1, momentum=0.9))
    layers = [n for n in trainer.graph.nodes if n.op == op]
    trained = any(n.op == f"{op}_grad" for n in trainer.graph.nodes)
    assert layers and all(bool(n.attrs.get("workspace")) == trained for n in layers)
    _assert_trains_as_eager(trainer, model, reference, batches, _sgd_momentum, rtol=1e-4)


def test_the_gradient_through_a_frozen_gru_trains_the_embedding_as_eager():
    torch.manual_seed(0)
    model = _Tagger("gru", num_layers=2)
    reference = copy.deepcopy(model)
    batches = _batches()
    trainer = et.compile(model, F.cross_entropy, *batches[0], scheme={"emb.*": "full"}, optimizer=et.AdamW(lr=0.01))
    backward = [n for n in trainer.graph.nodes if n.op == "gru_layer_grad"]
    # the input's gradient only: the frozen weights' products are not computed
    assert backward and all(n.attrs["wanted"] == (True, False, False, False, False, False) for n in backward)
    _assert_trains_as_eager(trainer, model, reference, batches, lambda ps: torch.optim.AdamW(ps, lr=0.01), rtol=1e-4)


# -- LSTM with a projection (edgetune/compiler/ir/ops/lstm_proj.py) --

@pytest.mark.parametrize("reverse", [False, True])
def test_a_projected_lstm_backward_from_the_kept_gates_equals_one_that_runs_the_forward_again(reverse):
    from edgetune.compiler.ir.ops.lstm_proj import _lstm_proj_layer, _lstm_proj_layer_grad, workspace_bytes
    from edgetune.compiler.ir.ops.recurrent import WORKSPACE

    g = torch.Generator().manual_seed(0)
    x, h0, c0 = (torch.randn(shape, generator=g) for shape in ((6, 3, 5), (3, 2), (3, 7)))
    weights = [torch.randn(shape, generator=g) for shape in ((28, 5), (28, 2), (28,), (28,), (2, 7))]
    packed = _lstm_proj_layer(x, h0, c0, *weights, reverse=reverse, workspace=workspace_bytes(x, weights[-1]))
    assert getattr(packed, WORKSPACE).nbytes == workspace_bytes(x, weights[-1])
    # without a backward to follow, the forward is ATen's LSTM: the same values, rounded its way
    torch.testing.assert_close(packed, _lstm_proj_layer(x, h0, c0, *weights, reverse=reverse), rtol=1e-5, atol=1e-6)
    grad_out = torch.randn(packed.shape, generator=g)
    kept = _lstm_proj_layer_grad(grad_out, packed, x, h0, c0, *weights, reverse=reverse)
    assert torch.equal(kept, _lstm_proj_layer_grad(grad_out, packed.clone(), x, h0, c0, *weights, reverse=reverse))
    # the wanted gradients only: the same values, packed one after the other
    only = _lstm_proj_layer_grad(grad_out, packed, x, h0, c0, *weights, reverse=reverse,
                                 wanted=(False, False, True, False, False, True, False, True))
    sizes = [math.prod(s) for s in ((6, 3, 5), (3, 2), (3, 7), (28, 5), (28, 2), (28,), (28,), (2, 7))]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    assert torch.equal(only, torch.cat([kept[starts[k]:starts[k] + sizes[k]] for k in (2, 5, 7)]))
    assert torch.equal(kept[starts[5]:starts[6]], kept[starts[6]:starts[7]])  # both biases' gradients


@pytest.mark.parametrize("lstm,scheme", [
    (dict(), {"*": "full"}),
    (dict(num_layers=2, bidirectional=True), {"*": "full"}),
    (dict(num_layers=2), {"lstm.*bias*": "full", "head.*": "full"}),
    (dict(bias=False), {"lstm.weight_hr_l0": 0.5, "lstm.weight_ih_l0": 0.5, "last.*": "full"}),
    (dict(bidirectional=True), {"head.*": "full", "last.*": "full"}),
], ids=["one-layer-full", "two-layer-bidirectional-full", "biases", "no-bias-partial-channels", "frozen"])
def test_projected_lstm_models_train_as_eager_does(lstm, scheme):
    _assert_looped_layers_train_as_eager("lstm", "lstm_proj_layer", scheme, proj_size=3, **lstm)


# -- nn.RNN (edgetune/compiler/ir/ops/simple_rnn.py) --

def test_the_frontend_keeps_an_rnn_whole_where_the_op_applies():
    x = torch.randn(5, 2, 3)
    assert "rnn_layer" in _ops_of(nn.RNN(3, 4, num_layers=2, bidirectional=True), x)
    assert "rnn_layer" in _ops_of(nn.RNN(3, 4, nonlinearity="relu", bias=False), x)
    assert {"rnn_layer", "dropout_mask"} <= _ops_of(nn.RNN(3, 4, num_layers=2, dropout=0.5).train(), x)


@pytest.mark.parametrize("rnn,scheme", [
    (dict(), {"*": "full"}),
    (dict(num_layers=2, bidirectional=True, nonlinearity="relu"), {"*": "full"}),
    (dict(num_layers=2), {"rnn.*bias*": "full", "head.*": "full"}),
    (dict(bias=False, nonlinearity="relu"), {"rnn.weight_hh_l0": 0.5, "rnn.weight_ih_l0": 0.5, "last.*": "full"}),
    (dict(bidirectional=True), {"emb.*": "full"}),
], ids=["tanh-full", "relu-two-layer-bidirectional-full", "biases", "relu-no-bias-partial-channels",
        "frozen-under-a-trained-embedding"])
def test_rnn_models_train_as_eager_does(rnn, scheme):
    """Three SGD steps: parameters and losses as eager's. The backward computes the wanted
    gradients only (a frozen layer: its input's)."""
    torch.manual_seed(0)
    model = _Tagger("rnn", **rnn)
    reference = copy.deepcopy(model)
    batches = _batches()
    trainer = et.compile(model, F.cross_entropy, *batches[0], scheme=scheme, optimizer=et.SGD(lr=0.1, momentum=0.9))
    backward = [n for n in trainer.graph.nodes if n.op == "rnn_layer_grad"]
    assert backward and any(n.op == "rnn_layer" for n in trainer.graph.nodes)
    if scheme == {"emb.*": "full"}:
        assert all(n.attrs["wanted"] == (True, False, False, False, False, False) for n in backward)
    _assert_trains_as_eager(trainer, model, reference, batches, _sgd_momentum, rtol=1e-4)


@pytest.mark.parametrize("kind, scheme, backward_products", [
    ("lstm", {"*": "full"}, 2),  # the input's and the weights' gradients (oneDNN's backward computes all)
    ("gru", {"*bias*": "full", "head.*": "full"}, 1),  # biases only: no weight-gradient products
])
def test_the_report_counts_a_recurrent_layers_products(kind, scheme, backward_products):
    torch.manual_seed(0)
    (ids,), labels = _batches(1)[0]
    model = _Tagger(kind)
    trainer = et.compile(model, F.cross_entropy, (ids,), labels, scheme=scheme, optimizer=et.SGD(lr=0.1))
    weights = getattr(model, kind).weight_ih_l0.numel() + getattr(model, kind).weight_hh_l0.numel()
    row = next(r for r in trainer.report().layers if r.module == kind)
    assert row.flops == 2 * ids.numel() * weights * (1 + backward_products)
