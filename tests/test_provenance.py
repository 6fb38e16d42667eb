"""provenance.py: what counts as a dirty checkout."""
from __future__ import annotations

import subprocess

from reproduce.provenance import git_state


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_untracked_code_makes_a_checkout_dirty_and_run_outputs_do_not(tmp_path):
    repo = tmp_path / "repo"
    (repo / "reproduce").mkdir(parents=True)
    (repo / "reproduce" / "train.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    state = git_state(repo)
    assert len(state.commit) == 40 and not state.dirty and str(state) == state.commit
    (repo / "runs").mkdir()
    (repo / "runs" / "ckpt.pt").write_text("")
    (repo / "mlflow.db").write_text("")
    assert not git_state(repo).dirty  # what runs write is not code
    (repo / "reproduce" / "new_module.py").write_text("y = 2\n")  # new, not yet committed code
    assert git_state(repo).dirty and str(git_state(repo)).endswith("+dirty")
    (repo / "reproduce" / "new_module.py").unlink()
    (repo / "reproduce" / "train.py").write_text("x = 2\n")
    assert git_state(repo).dirty


def test_outside_git_the_state_is_unknown(tmp_path):
    state = git_state(tmp_path)
    assert state.commit == "unknown" and not state.dirty
