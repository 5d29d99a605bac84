"""Multi-task balancing methods: shared property tests over every method, parity with torchjd
called directly, formula checks for the hand-written methods, and checkpointable state."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import advance_balancer, balancer_tensors
from hypothesis import given, settings
from hypothesis import strategies as st
from torchjd import aggregation, scalarization

from transferkit.balancing import DBMTL, METHODS, Balancer, GradNorm, LossCombiner, build_method
from transferkit.balancing.jacobian import cosine_similarities, objective_gradients
from transferkit.errors import UserError

LOSS_METHODS = [name for name, m in METHODS.items() if m.kind == "loss"]
GRADIENT_METHODS = [name for name, m in METHODS.items() if m.kind == "gradient"]
TASKS = ["a", "b", "c"]


def _case(seed: int, k: int = 3, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(k, n, generator=generator, dtype=torch.float64).float()
    losses = torch.rand(k, generator=generator) + 0.2
    return jacobian, losses


def _direction(name: str, jacobian, losses, present=None, position=(0, 0)) -> torch.Tensor:
    balancer = Balancer(name, [f"task{i}" for i in range(len(losses))])
    present = torch.ones(len(losses), dtype=torch.bool) if present is None else present
    return balancer.aggregate(jacobian, losses, present, *position)


def _combined(name: str, losses, present=None):
    balancer = Balancer(name, TASKS[: len(losses)])
    present = torch.ones(len(losses), dtype=torch.bool) if present is None else present
    vector = losses.clone().requires_grad_(True) * 1.0
    return balancer.combine(vector, present, 0, 0), balancer


# ---------------------------------------------------------------------------------------------
# Properties every method shares


@pytest.mark.parametrize("name", GRADIENT_METHODS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_methods_give_a_finite_direction_of_the_right_shape(name, seed):
    jacobian, losses = _case(seed)
    direction = _direction(name, jacobian, losses)
    assert direction.shape == (jacobian.shape[1],)
    assert torch.isfinite(direction).all()


@pytest.mark.parametrize("name", LOSS_METHODS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_methods_give_a_finite_scalar_with_finite_weights(name, seed):
    _, losses = _case(seed)
    combined, balancer = _combined(name, losses)
    assert combined.shape == () and torch.isfinite(combined)
    weights = balancer.last_weights
    assert weights.shape == (3,) and torch.isfinite(weights).all() and (weights > 0).all()


@pytest.mark.parametrize("name", list(METHODS))
def test_the_registry_declares_what_each_method_needs_of_the_engine(name):
    """The engine asks the balancer, which reads the registry; the built method must agree."""
    method, balancer = METHODS[name], Balancer(name, TASKS)
    built = build_method(name, len(TASKS))
    if method.kind == "gradient":
        assert not (method.learnable or method.losses_after_step or method.global_values)
        assert balancer.runs_under_fsdp is False and balancer.learnable_parameters() == []
        return
    assert built.learnable == method.learnable == balancer.learnable
    assert built.global_values == method.global_values
    has_hook = type(built).after_step is not LossCombiner.after_step
    assert has_hook == method.losses_after_step == balancer.needs_losses_after_step
    trainable = [p for p in balancer.learnable_parameters() if p.requires_grad]
    assert bool(trainable) == method.learnable
    assert balancer.runs_under_fsdp == (not method.learnable and not method.losses_after_step)


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_a_balancer_averages_over_processes_only_the_values_its_state_is_built_from(name):
    """`reduce` (the mean over processes) is given at construction and called only by methods
    whose state is built from loss values (DWA, FAMO); the others see their own losses."""
    calls = []

    def reduce(values: torch.Tensor) -> torch.Tensor:
        calls.append(values)
        return values

    balancer = Balancer(name, TASKS, reduce=reduce)
    _, losses = _case(5)
    balancer.combine(
        losses.clone().requires_grad_(True) * 1.0, torch.ones(3, dtype=torch.bool), 0, 1
    )
    if balancer.needs_losses_after_step:
        balancer.after_step(losses * 0.9, torch.ones(3, dtype=torch.bool))
    assert bool(calls) == METHODS[name].global_values


@pytest.mark.parametrize("name", [n for n in GRADIENT_METHODS if not METHODS[n].randomized])
def test_gradient_methods_do_not_depend_on_task_order(name):
    if name == "pcd":
        pytest.skip("PCD treats the first task as the primary one, by design")
    jacobian, losses = _case(3)
    order = torch.tensor([2, 0, 1])
    direction = _direction(name, jacobian, losses)
    permuted = _direction(name, jacobian[order], losses[order])
    assert torch.allclose(direction, permuted, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", [n for n in LOSS_METHODS if not METHODS[n].randomized])
def test_loss_methods_do_not_depend_on_task_order(name):
    _, losses = _case(4)
    order = torch.tensor([2, 0, 1])
    combined, first = _combined(name, losses)
    permuted, second = _combined(name, losses[order])
    assert torch.allclose(combined, permuted, atol=1e-6)
    assert torch.allclose(first.last_weights[order], second.last_weights, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in GRADIENT_METHODS if METHODS[n].randomized])
def test_random_methods_draw_the_same_on_every_process(name):
    """The draws depend on the position (epoch, batch) only: two ranks, or a resumed run, get
    the same direction; another position gets another one."""
    jacobian, losses = _case(5)
    same = [_direction(name, jacobian, losses, position=(1, 7)) for _ in range(2)]
    assert torch.equal(same[0], same[1])
    torch.manual_seed(123)  # a rank's own random stream does not matter
    assert torch.equal(_direction(name, jacobian, losses, position=(1, 7)), same[0])


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_identical_task_gradients_give_a_positive_multiple_of_it(name):
    """When every task wants the same thing, every method must go that way."""
    gradient = torch.randn(40, generator=torch.Generator().manual_seed(6))
    jacobian = gradient.repeat(3, 1)
    direction = _direction(name, jacobian, torch.ones(3))
    cosine = torch.nn.functional.cosine_similarity(direction, gradient, dim=0)
    assert cosine > 0.999 and direction.norm() > 0


@given(seed=st.integers(0, 10_000), k=st.integers(2, 5))
@settings(max_examples=25, deadline=None, derandomize=True)  # the same cases on every run
def test_nonconflicting_methods_never_increase_a_task_loss(seed, k):
    jacobian, losses = _case(seed, k=k, n=12)
    for name in [n for n in GRADIENT_METHODS if METHODS[n].nonconflicting]:
        direction = _direction(name, jacobian, losses)
        # torchjd solves a regularized QP: allow a cosine of -2e-3 for numerical slack (a
        # random search found DualProj at -1.3e-3; a real conflict is far below that).
        cosines = jacobian @ direction / (jacobian.norm(dim=1) * direction.norm() + 1e-12)
        assert (cosines >= -2e-3).all(), (name, cosines)


@pytest.mark.parametrize("name", [n for n in GRADIENT_METHODS if METHODS[n].no_conflict_result])
def test_without_conflict_the_method_reduces_to_sum_or_mean(name):
    """Non-negative gradients never conflict: PCGrad is then the sum, UPGrad the mean..."""
    generator = torch.Generator().manual_seed(7)
    jacobian = torch.rand(3, 30, generator=generator)
    expected = jacobian.sum(0) if METHODS[name].no_conflict_result == "sum" else jacobian.mean(0)
    assert torch.allclose(_direction(name, jacobian, torch.ones(3)), expected, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in LOSS_METHODS if METHODS[n].start_scale is not None])
def test_loss_methods_start_as_the_plain_sum_where_they_say_so(name):
    _, losses = _case(8)
    scale = METHODS[name].start_scale
    scale = 1 / len(losses) if scale == "1/K" else scale
    combined, balancer = _combined(name, losses)
    assert torch.allclose(balancer.last_weights, torch.full((3,), scale))
    if name not in ("uw", "imtl_l"):  # they add their regularizer, which is 0 at the start
        assert torch.allclose(combined, scale * losses.sum())


def test_gradnorm_starts_as_the_plain_sum():
    jacobian, losses = _case(9)
    assert torch.allclose(_direction("gradnorm", jacobian, losses), jacobian.sum(0), atol=1e-6)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_absent_tasks_take_no_part(name):
    """A task with no label in the batch: its row is ignored, whatever it holds."""
    jacobian, losses = _case(10)
    present = torch.tensor([True, False, True])
    with_garbage = jacobian.clone()
    with_garbage[1] = 1e6
    a = _direction(name, jacobian, losses, present)
    b = _direction(name, with_garbage, losses, present)
    assert torch.allclose(a, b, atol=1e-5)
    balancer = Balancer(name, TASKS)
    balancer.aggregate(jacobian, losses, present, 0, 0)
    assert "b" not in balancer.weights_dict()
    assert all("b" not in pair for pair in balancer.cosines_dict())


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_absent_tasks_get_no_gradient_in_loss_methods(name):
    losses = torch.tensor([0.7, 0.4, 1.3], requires_grad=True)
    balancer = Balancer(name, TASKS)
    combined = balancer.combine(losses * 1.0, torch.tensor([True, False, True]), 0, 0)
    (grad,) = torch.autograd.grad(combined, losses)
    assert grad[1] == 0 and torch.isfinite(grad).all()


# ---------------------------------------------------------------------------------------------
# Parity: our adapter gives what torchjd gives when called directly

_TORCHJD = {
    "mgda": lambda k: aggregation.MGDA(),
    "pcgrad": lambda k: aggregation.PCGrad(),
    "cagrad": lambda k: aggregation.CAGrad(c=0.4),
    "imtl_g": lambda k: aggregation.IMTLG(),
    "nash_mtl": lambda k: aggregation.NashMTL(n_tasks=k),
    "aligned_mtl": lambda k: aggregation.AlignedMTL(),
    "upgrad": lambda k: aggregation.UPGrad(),
    "dualproj": lambda k: aggregation.DualProj(),
    "config": lambda k: aggregation.ConFIG(),
    "graddrop": lambda k: aggregation.GradDrop(),
    "rgw": lambda k: aggregation.Random(),
    "fairgrad": lambda k: aggregation.FairGrad(alpha=1.0),
    "gradvac": lambda k: aggregation.GradVac(),
    "excess_mtl": lambda k: aggregation.ExcessMTL(),
    "pcd": lambda k: aggregation.PCD(),
}


def test_every_torchjd_backed_method_is_checked_for_parity():
    handwritten = {"gradnorm", "db_mtl"}
    assert set(_TORCHJD) == set(GRADIENT_METHODS) - handwritten


@pytest.mark.parametrize("name", sorted(_TORCHJD))
def test_adapter_matches_torchjd_called_directly(name):
    from transferkit.balancing.balancer import _RNG_STREAM
    from transferkit.core.seeding import derive_seed

    reference = _TORCHJD[name](3)
    balancer = Balancer(name, TASKS, seed=11)
    present = torch.ones(3, dtype=torch.bool)
    for step in range(3):  # several steps: stateful methods must keep matching
        jacobian, losses = _case(20 + step)
        ours = balancer.aggregate(jacobian, losses, present, 0, step)
        torch.manual_seed(derive_seed(11, _RNG_STREAM, 0, step))
        theirs = reference(jacobian)
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), step


@pytest.mark.parametrize(
    "name, reference",
    [("mean", lambda: scalarization.Mean()), ("uw", lambda: scalarization.UW(3)),
     ("imtl_l", lambda: scalarization.IMTLL(3)), ("gls", lambda: scalarization.GeometricMean()),
     ("dwa", lambda: scalarization.DWA()), ("rlw", lambda: scalarization.Random())],
)  # fmt: skip
def test_loss_adapter_matches_torchjd_called_directly(name, reference):
    from transferkit.balancing.balancer import _RNG_STREAM
    from transferkit.core.seeding import derive_seed

    ref = reference()
    balancer = Balancer(name, TASKS, seed=2)
    for epoch in range(4):
        for batch in range(2):
            _, losses = _case(30 + 2 * epoch + batch)
            ours = balancer.combine(losses, torch.ones(3, dtype=torch.bool), epoch, batch)
            torch.manual_seed(derive_seed(2, _RNG_STREAM, epoch, batch))
            assert torch.allclose(ours, ref(losses), atol=1e-6)
        balancer.end_epoch()
        if hasattr(ref, "step"):
            ref.step()


# ---------------------------------------------------------------------------------------------
# Formulas, on cases small enough to compute by hand


def test_uw_formula():
    """UW: sum_i 0.5 exp(-s_i) L_i + 0.5 s_i; with s = (0, ln 2): 0.5*1 + 0.25*2 + 0.5 ln 2."""
    balancer = Balancer("uw", ["a", "b"])
    state = balancer.state_dict()
    state["module"]["scalarizer.log_var"] = torch.tensor([0.0, torch.log(torch.tensor(2.0))])
    balancer.load_state_dict(state)
    losses = torch.tensor([1.0, 2.0], requires_grad=True) * 1.0
    combined = balancer.combine(losses, torch.ones(2, dtype=torch.bool), 0, 0)
    assert combined.item() == pytest.approx(0.5 + 0.5 + 0.5 * 0.693147, abs=1e-5)
    assert balancer.last_weights.tolist() == pytest.approx([0.5, 0.25])


def test_dwa_formula():
    """DWA: weights K softmax(w / T) with w_k = L_k(t-1) / L_k(t-2), from epoch averages."""
    balancer = Balancer("dwa", ["a", "b"])
    on = torch.ones(2, dtype=torch.bool)
    for epoch_losses in ([1.0, 1.0], [0.5, 1.0]):  # task a halved its loss, b did not move
        balancer.combine(torch.tensor(epoch_losses), on, 0, 0)
        balancer.end_epoch()
    balancer.combine(torch.tensor([0.3, 0.9], requires_grad=True) * 1.0, on, 2, 0)
    rates = torch.tensor([0.5, 1.0]) / 2.0
    expected = 2 * torch.softmax(rates, dim=0)
    assert torch.allclose(balancer.last_weights, expected, atol=1e-6)


def test_gradnorm_formula():
    """One GradNorm step by hand. J rows with norms 3 and 1, L(0) = (1, 1), L = (0.5, 1).
    Weights w = (1, 1): G = (3, 1), Ḡ = 2; r = (0.5, 1)/0.75 = (2/3, 4/3); alpha = 1:
    target = (4/3, 8/3). sign(G - target) = (+1, -1), so dL/dw = (3, -1). With w = 2 softmax(s)
    at s = 0: dw/ds = [[0.5, -0.5], [-0.5, 0.5]], dL/ds = (2, -2); one Adam step of lr moves s by
    (-lr, +lr): the weak task (b) gains weight."""
    jacobian = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    method = GradNorm(2, alpha=1.0, lr=0.1)
    on = torch.ones(2, dtype=torch.bool)
    first = method(jacobian, torch.tensor([1.0, 1.0]), on)  # records L(0), direction = sum
    assert torch.allclose(first, torch.tensor([3.0, 1.0]))
    method.logits.data.zero_()
    method._optimizer = torch.optim.Adam([method.logits], lr=0.1)
    second = method(jacobian, torch.tensor([0.5, 1.0]), on)
    assert torch.allclose(second, torch.tensor([3.0, 1.0]))  # weights before their update
    assert torch.allclose(method.logits.detach(), torch.tensor([-0.1, 0.1]), atol=1e-6)
    expected = 2 * torch.softmax(torch.tensor([-0.1, 0.1]), dim=0)
    assert torch.allclose(method.weights(), expected)
    assert method.weights().sum().item() == pytest.approx(2.0)


def test_db_mtl_formula():
    """DB-MTL by hand: log-loss gradients J_i / L_i; EMA g <- J' + beta (g - J') from g = 0;
    then d = sum_i (max_j |g_j| / |g_i|) g_i."""
    jacobian = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    losses = torch.tensor([2.0, 0.25])  # log-loss gradients: (1, 0) and (0, 4)
    method = DBMTL(2, beta=0.5, beta_sigma=0.0, eps=0.0)
    on = torch.ones(2, dtype=torch.bool)
    direction = method(jacobian, losses, on)
    # g = 0.5 * (1, 0) and 0.5 * (0, 4): norms 0.5 and 2; alpha = (4, 1)
    assert torch.allclose(direction, torch.tensor([2.0, 2.0]))
    assert torch.allclose(method.last_weights, torch.tensor([4.0, 1.0]))
    direction = method(jacobian, losses, on)  # g = 0.75 * rows: same balance, larger
    assert torch.allclose(direction, torch.tensor([3.0, 3.0]))


# ---------------------------------------------------------------------------------------------
# State: checkpointed with the run, readable with weights_only, and exact after a reload


def _state_roundtrip(balancer: Balancer) -> dict:
    buffer = io.BytesIO()
    torch.save(balancer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


STATEFUL = [n for n, m in METHODS.items() if m.stateful]


@pytest.mark.parametrize("name", STATEFUL)
def test_stateful_methods_continue_exactly_after_a_reload(name):
    original = Balancer(name, TASKS)
    for i in range(5):
        advance_balancer(original, i)
    restored = Balancer(name, TASKS)
    restored.load_state_dict(_state_roundtrip(original))
    for i in range(5, 8):
        expected, got = advance_balancer(original, i), advance_balancer(restored, i)
        assert torch.allclose(expected, got, rtol=1e-6, atol=1e-7), (name, i)


# State that stays on the CPU whatever the run's device, as in a run that never stopped: torchjd
# solves GradVac and PCD on the CPU and keeps their averages there, and torch's Adam keeps its
# step counters there unless it is capturable or fused (NumPy arrays, Nash-MTL's warm start, are
# host memory and are not listed by `balancer_tensors`).
HOST_STATE = {"gradvac": {"_phi_t"}, "pcd": {"_sq_norm_ema", "_n_steps"}}


def _assert_state_on(balancer: Balancer, device: str) -> None:
    host = HOST_STATE.get(balancer.name, set())
    for path, tensor in balancer_tensors(balancer).items():
        name = path.rsplit(".", 1)[-1]
        in_optimizer = ".state." in path and name == "step"
        expected = "cpu" if name in host or in_optimizer else device
        assert tensor.device.type == expected, (balancer.name, path, tensor.device)
    # A device the method recorded (ExcessMTL keys its state by it) follows the state.
    text = repr(balancer.state_dict()["extra"])
    assert text.count("'__device__'") == text.count(f"'__device__': '{device}")


@pytest.mark.parametrize("name", STATEFUL)
def test_state_is_loaded_onto_the_device_the_balancer_is_on(name):
    """Accelerate loads a registered object's state on the CPU; a balancer on a GPU must get
    it back on the GPU (meta stands in for the GPU here)."""
    original = Balancer(name, ["a", "b"])
    for i in range(4):
        advance_balancer(original, i)
    state = _state_roundtrip(original)
    assert balancer_tensors(original) or name == "nash_mtl", name  # Nash-MTL's state is NumPy
    restored = Balancer(name, ["a", "b"])
    restored.to("meta")
    restored.load_state_dict(state)
    assert set(balancer_tensors(restored)) == set(balancer_tensors(original))
    _assert_state_on(restored, "meta")


@pytest.mark.parametrize("name", STATEFUL)
def test_moving_keeps_the_state_exact(name):
    """`to` rebuilds what it moves (internal optimizers, Nash-MTL's solver): nothing changes."""
    kept, moved = Balancer(name, TASKS), Balancer(name, TASKS)
    for i in range(5):
        advance_balancer(kept, i)
        advance_balancer(moved, i)
    moved.to("cpu")
    for i in range(5, 8):
        assert torch.equal(advance_balancer(kept, i), advance_balancer(moved, i)), (name, i)


@pytest.mark.parametrize("name", STATEFUL)
def test_to_moves_the_whole_state(name):
    balancer = Balancer(name, ["a", "b"])
    for i in range(4):
        advance_balancer(balancer, i)
    before = set(balancer_tensors(balancer))
    assert balancer.to("meta") is balancer
    assert set(balancer_tensors(balancer)) == before
    _assert_state_on(balancer, "meta")


# ---------------------------------------------------------------------------------------------
# Jacobians: frozen layers and nested auxiliary features


def _nested_model():
    torch.manual_seed(0)
    stem, middle, top = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    main_head, aux_head = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    return stem, middle, top, main_head, aux_head


def test_auxiliary_head_on_an_intermediate_layer_gets_the_true_jacobian():
    """An aux loss on the middle features reaches stem and middle, never top; each row must
    equal that loss's own gradient, computed separately."""
    stem, middle, top, main_head, aux_head = _nested_model()
    x = torch.randn(8, 4)
    hidden = middle(torch.relu(stem(x)))
    main = main_head(torch.relu(top(torch.relu(hidden)))).pow(2).mean()
    aux = aux_head(torch.relu(hidden)).pow(2).mean()
    shared = [*stem.parameters(), *middle.parameters(), *top.parameters()]
    jacobian, own = objective_gradients(
        [main, aux], shared, [list(main_head.parameters()), list(aux_head.parameters())]
    )
    for row in (0, 1):
        hidden = middle(torch.relu(stem(x)))
        fresh = (
            main_head(torch.relu(top(torch.relu(hidden)))).pow(2).mean()
            if row == 0
            else aux_head(torch.relu(hidden)).pow(2).mean()
        )
        grads = torch.autograd.grad(fresh, shared, allow_unused=True)
        expected = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                              for p, g in zip(shared, grads)])  # fmt: skip
        assert torch.allclose(jacobian[row], expected, atol=1e-6)
    top_columns = slice(-sum(p.numel() for p in top.parameters()), None)
    assert torch.count_nonzero(jacobian[1, top_columns]) == 0
    assert all(g.abs().sum() > 0 for g in own[1])


def test_frozen_parameters_take_no_part_in_the_jacobian():
    stem, middle, top, main_head, aux_head = _nested_model()
    for p in stem.parameters():
        p.requires_grad_(False)
    x = torch.randn(8, 4)
    hidden = middle(torch.relu(stem(x)))
    loss_a = main_head(torch.relu(top(hidden))).pow(2).mean()
    loss_b = aux_head(torch.relu(hidden)).pow(2).mean()
    shared = [p for m in (stem, middle, top) for p in m.parameters() if p.requires_grad]
    jacobian, _ = objective_gradients([loss_a, loss_b], shared, [[], []])
    assert jacobian.shape == (2, sum(p.numel() for p in shared))
    assert all(p.grad is None for p in stem.parameters())


def test_cosine_similarities_of_rows():
    jacobian = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    cos = cosine_similarities(jacobian)
    assert cos[0, 1].item() == pytest.approx(2**-0.5)
    assert cos[0, 2].item() == 0.0


def test_fp16_scaled_jacobian_gives_the_unscaled_direction_scaled():
    """Under fp16 the Jacobian is of scaled losses: Nash-MTL (not scale-invariant) must see the
    true one; on overflow the non-finite sum goes to the scaler, and the state is untouched."""
    jacobian, losses = _case(50)
    on = torch.ones(3, dtype=torch.bool)
    plain = Balancer("gradnorm", TASKS).aggregate(jacobian, losses, on, 0, 0)
    balancer = Balancer("gradnorm", TASKS)
    scaled = balancer.scaled_direction(jacobian * 1024.0, losses, on, 1024.0, 0, 0)
    assert torch.allclose(scaled / 1024.0, plain, atol=1e-5)
    before = balancer.state_dict()["module"]["logits"].clone()
    overflow = jacobian.clone()
    overflow[0, 0] = float("inf")
    out = balancer.scaled_direction(overflow, losses, on, 1024.0, 0, 1)
    assert not torch.isfinite(out).all()
    assert torch.equal(balancer.state_dict()["module"]["logits"], before)


# ---------------------------------------------------------------------------------------------
# Clear errors


@pytest.mark.parametrize(
    "name, options, message",
    [("upgrd", {}, "Did you mean: upgrad"), ("cagrad", {"cc": 0.1}, "multitask.options.cc"),
     ("dwa", {"temperature": -1.0}, "multitask.options for dwa"),
     ("uw", {"x": 1}, "it takes no options")],
)  # fmt: skip
def test_bad_method_or_options_name_the_key(name, options, message):
    with pytest.raises(UserError, match=message):
        build_method(name, 3, options)


def test_delta_m_is_signed_so_lower_is_better():
    from transferkit.runs import delta_m

    single = {"digit/accuracy": 0.8, "ink/mae": 0.5}
    # accuracy +10% relative (better: -10), MAE +20% relative (worse: +20): mean +5
    assert delta_m({"digit/accuracy": 0.88, "ink/mae": 0.6}, single) == pytest.approx(5.0)
    assert delta_m(single, single) == 0.0
    with pytest.raises(ValueError):
        delta_m({}, {})


def test_seconds_per_step_skips_the_first_epoch(tmp_path):
    import json

    from transferkit.runs import seconds_per_step

    lines = [{"epoch": 0, "step": 4, "epoch_time_s": 100.0},
             {"epoch": 1, "step": 8, "epoch_time_s": 2.0},
             {"epoch": 2, "step": 12, "epoch_time_s": 2.0}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert seconds_per_step(tmp_path) == pytest.approx(0.5)


def test_docs_list_every_method_as_the_registry_does():
    from conftest import ROOT

    from transferkit.balancing.methods import methods_markdown

    assert methods_markdown() in (ROOT / "docs/multitask.md").read_text()
