"""Repository weight: every model file or large file committed under bench/ is one bench/model_files.txt
names (headline rows, or committed before the rule); replay sets stay results-sized."""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")
LARGE = 1 << 20  # bytes: anything this large under bench/ is a model or a dataset, not a result


def tracked_bench_files() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "bench"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return out.split()


def allowed() -> set[str]:
    with open(os.path.join(ROOT, "bench", "model_files.txt"), encoding="utf-8") as f:
        return {line.split()[0] for line in f if line.strip() and not line.startswith("#")}


def heavy(path: str, root: str = ROOT) -> bool:
    """A file the rule covers: a model file outside a replay set, or any file of LARGE bytes or more."""
    size = os.path.getsize(os.path.join(root, path))
    replay_set = "/replay/" in path and path.endswith(".pt")
    return size >= LARGE or (path.endswith(MODEL_SUFFIXES) and not replay_set)


def test_every_model_file_under_bench_is_listed():
    unlisted = [p for p in tracked_bench_files() if heavy(p) and p not in allowed()]
    assert not unlisted, (
        f"model or large files under bench/ not named in bench/model_files.txt: {unlisted} — commit "
        "results, configs and timing; a checkpoint only for a headline row (then list it with its reason)"
    )


def test_the_list_names_only_committed_files():
    missing = sorted(allowed() - set(tracked_bench_files()))
    assert not missing, f"bench/model_files.txt names files that are not committed: {missing}"


def test_the_rule_sees_a_new_checkpoint(tmp_path):
    # the predicate the test relies on: a stage checkpoint is covered, a small replay set and a table are not
    for rel, size, covered in [
        ("bench/x/runs/a/checkpoints/stage0-train.pt", 10, True),
        ("bench/x/runs/a/replay/stage0.pt", 10, False),
        ("bench/x/runs/a/replay/stage0.pt", LARGE, True),
        ("bench/x/results.md", 10, False),
    ]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"0" * size)
        assert heavy(rel, root=str(tmp_path)) is covered, rel
