"""WeightGuard: on-demand and background re-hashing of live weights."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from torch_integrity import WeightGuard
from torch_integrity.digest import Digest, digest_state_dict
from torch_integrity.errors import DigestMismatchError, IntegrityError, UsageError


def make_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def flip_bit(tensor: torch.Tensor, index: int = 3, bit: int = 0) -> None:
    """Flip one bit of one element in place, through an integer view of the same storage."""
    with torch.no_grad():
        tensor.view(torch.int32).view(-1)[index] ^= 1 << bit


def test_check_passes_on_the_expected_weights() -> None:
    model = make_model()
    expected = digest_state_dict(model.state_dict())
    result = WeightGuard(model, expected).check()
    assert result.root == expected.root
    assert result.tensors == 4
    assert result.nbytes == sum(p.numel() * 4 for p in model.parameters())


def test_one_flipped_bit_is_caught_and_named() -> None:
    model = make_model()
    guard = WeightGuard(model, digest_state_dict(model.state_dict()))
    flip_bit(model.get_parameter("2.weight"), index=7, bit=0)  # the lowest mantissa bit: a change of ~1e-8
    with pytest.raises(DigestMismatchError, match=r"differing tensors: 2\.weight") as caught:
        guard.check()
    assert caught.value.differing == ("2.weight",)
    flip_bit(model.get_parameter("2.weight"), index=7, bit=0)  # flipped back: the weights are the approved ones again
    guard.check()


def test_background_thread_calls_the_handler_naming_the_tensor() -> None:
    model = make_model()
    caught: list[IntegrityError] = []
    called = threading.Event()

    def on_mismatch(error: IntegrityError) -> None:
        caught.append(error)
        called.set()

    guard = WeightGuard(model, digest_state_dict(model.state_dict()), interval=0.02, on_mismatch=on_mismatch)
    with guard:
        assert guard.running
        deadline = time.monotonic() + 5
        while guard.checks < 2 and time.monotonic() < deadline:  # let it pass a few clean checks first
            time.sleep(0.01)
        assert guard.checks >= 2 and not caught
        flip_bit(model.get_parameter("0.bias"), index=5, bit=30)  # a live, in-place change while the thread runs
        assert called.wait(5), "the guard never reported the flipped weight"
        checks_then = guard.checks
        while guard.checks < checks_then + 3 and time.monotonic() < deadline + 5:
            time.sleep(0.01)
    assert not guard.running
    assert len(caught) == 1, "the same bad state is reported once, not at every interval"
    assert isinstance(caught[0], DigestMismatchError)
    assert caught[0].differing == ("0.bias",)
    assert str(guard.last_error) == str(caught[0])  # the latest check still fails the same way


def test_replaced_or_added_tensors_are_caught() -> None:
    model = make_model()
    guard = WeightGuard(model, digest_state_dict(model.state_dict()))
    original = model.get_parameter("0.weight")
    model[0].weight = torch.nn.Parameter(original.detach().clone() * 1.0001)  # a fine-tuned copy swapped in
    with pytest.raises(DigestMismatchError) as caught:
        guard.check()
    assert caught.value.differing == ("0.weight",)
    model[0].weight = original
    model.register_buffer("backdoor", torch.ones(1))
    with pytest.raises(DigestMismatchError) as caught:
        guard.check()
    assert caught.value.differing == ("backdoor",)


def test_root_only_expectation_detects_but_cannot_name() -> None:
    model = make_model()
    expected = digest_state_dict(model.state_dict())
    guard = WeightGuard(model, expected.root)
    guard.check()
    flip_bit(model.get_parameter("0.weight"))
    with pytest.raises(DigestMismatchError) as caught:
        guard.check()
    assert caught.value.differing == ()
    named = WeightGuard(model, expected.root, tensor_digests=expected.tensors)
    with pytest.raises(DigestMismatchError, match=r"0\.weight"):
        named.check()


def test_update_expected_while_paused() -> None:
    model = make_model()
    guard = WeightGuard(model, digest_state_dict(model.state_dict()))
    with guard.paused():
        with torch.no_grad():
            model.get_parameter("2.bias").add_(1.0)
        guard.update_expected(digest_state_dict(model.state_dict()))
    guard.check()


def test_a_state_dict_mapping_can_be_guarded() -> None:
    state = {"w": torch.arange(6, dtype=torch.float32)}
    guard = WeightGuard(state, digest_state_dict(state))
    guard.check()
    state["w"][0] = -1.0
    with pytest.raises(DigestMismatchError, match="differing tensors: w"):
        guard.check()


def test_handler_errors_do_not_stop_the_guard() -> None:
    state = {"w": torch.zeros(4)}
    calls: list[IntegrityError] = []

    def bad_handler(error: IntegrityError) -> None:
        calls.append(error)
        raise RuntimeError("pager is down")

    guard = WeightGuard(state, digest_state_dict(state), interval=0.01, on_mismatch=bad_handler)
    state["w"][1] = 1.0
    with guard:
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        state["w"][2] = 1.0  # a second, different bad state is reported too
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert guard.running
    assert len(calls) == 2


def test_unhashable_weights_fail_closed_in_the_background() -> None:
    state = {"w": torch.zeros(4)}
    got = threading.Event()
    errors: list[IntegrityError] = []

    def on_mismatch(error: IntegrityError) -> None:
        errors.append(error)
        got.set()

    guard = WeightGuard(state, digest_state_dict(state), interval=0.01, on_mismatch=on_mismatch)
    state["w"] = torch.zeros(4).to_sparse()
    with guard:
        assert got.wait(5)
    assert isinstance(errors[0], UsageError)


def test_bad_arguments() -> None:
    model = make_model()
    expected = digest_state_dict(model.state_dict())
    with pytest.raises(UsageError, match="interval"):
        WeightGuard(model, expected, interval=0)
    with pytest.raises(UsageError, match="needs interval"):
        WeightGuard(model, expected).start()
    with pytest.raises(UsageError, match="sha256-merkle-v1"):
        WeightGuard(model, Digest("sha256", "00" * 32))
    with pytest.raises(UsageError, match="do not combine"):
        WeightGuard(model, Digest("sha256-merkle-v1", "00" * 32), tensor_digests=expected.tensors)
    with pytest.raises(UsageError, match=r"nn\.Module or a state dict"):
        WeightGuard([1, 2], expected)  # type: ignore[arg-type]


@pytest.mark.gpu
def test_cuda_weights_are_checked_in_place() -> None:
    model = make_model().cuda()
    guard = WeightGuard(model, digest_state_dict(model.state_dict()))
    assert guard.check().root == digest_state_dict({k: v.cpu() for k, v in model.state_dict().items()}).root
    flip_bit(model.get_parameter("2.weight"))
    with pytest.raises(DigestMismatchError, match=r"2\.weight"):
        guard.check()
