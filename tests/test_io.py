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


def test_a_full_disk_while_saving_says_so_and_keeps_the_old_file(tmp_path, monkeypatch):
    import errno

    import pytest
    import torch

    from tlvit.io import save_torch_atomic

    path = tmp_path / "checkpoint.pt"
    save_torch_atomic({"epoch": 1}, path)

    def full(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("u", (), {"free": 4096})())
    with pytest.raises(OSError, match=r"no space left on the device while saving checkpoint.pt") as e:
        save_torch_atomic({"epoch": 2}, path)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1} and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
