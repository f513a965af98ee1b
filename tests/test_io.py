"""Atomic writes give the same bytes for the same content (DVC hashes them: a re-run that changes nothing
must not look like a change to the stages after it)."""
import torch

from tlvit.io import save_torch_atomic


def test_the_same_weights_give_the_same_file(tmp_path):
    torch.manual_seed(0)
    state = torch.nn.Linear(4, 3).state_dict()
    save_torch_atomic(state, tmp_path / "a" / "model.pth")
    save_torch_atomic(state, tmp_path / "b" / "model.pth")  # each through its own random temporary name
    first, second = (tmp_path / d / "model.pth" for d in ("a", "b"))
    assert first.read_bytes() == second.read_bytes()
    loaded = torch.load(first)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    state["weight"] += 1
    save_torch_atomic(state, second)
    assert first.read_bytes() != second.read_bytes()


def test_atomic_writes_get_the_mode_a_plain_write_gets(tmp_path):
    import os
    import stat

    from tlvit.io import atomic_path

    with atomic_path(tmp_path / "atomic.json") as tmp:
        tmp.write_text("{}")
    (tmp_path / "plain.json").write_text("{}")
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "atomic.json") == mode(tmp_path / "plain.json") != 0o600
