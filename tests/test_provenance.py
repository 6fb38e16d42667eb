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


def test_runs_trained_in_one_process_carry_the_commit_it_loaded(cifar_tar, monkeypatch):
    """A sweep or study trains its runs one after another in one process: a commit made meanwhile
    (here: git reporting a new HEAD on every read) does not change the code that process runs, so
    every run is tagged with the state read when the first started."""
    import itertools

    import mlflow

    from reproduce import provenance, train
    from tests.conftest import REPO, tiny_overrides

    heads = (provenance.GitState(f"{n:040x}", False) for n in itertools.count(1))
    monkeypatch.setattr(provenance, "git_state", lambda repo=REPO: next(heads))
    provenance.code_state.cache_clear()
    try:
        for seed in (0, 1):
            assert (
                train.main(
                    [
                        "--config",
                        str(REPO / "configs" / "cifar10" / "resnet20.yaml"),
                        f"seed={seed}",
                        *tiny_overrides(cifar_tar, iterations=2),
                    ]
                )
                == 0
            )
    finally:
        provenance.code_state.cache_clear()
    runs = mlflow.search_runs(experiment_names=["cifar10"], output_format="list")
    assert len(runs) == 2
    assert {r.data.tags["reproduce.git_commit"] for r in runs} == {f"{1:040x}"}
    assert {r.data.tags["mlflow.source.git.commit"] for r in runs} == {f"{1:040x}"}
