from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """Path to `../shared/data` (read-only corpora, tokenizers, MNIST); skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs ../shared/data beside the checkout (looked in {SHARED_DATA})")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _precision_cache(tmp_path_factory):
    """`precision=auto` records its decisions in a session directory, not the user's cache
    (subprocesses inherit it)."""
    import os

    saved = os.environ.get("XDLM_CACHE_DIR")
    os.environ["XDLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("xdlm_cache"))
    yield
    if saved is None:
        os.environ.pop("XDLM_CACHE_DIR")
    else:
        os.environ["XDLM_CACHE_DIR"] = saved


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """60 KB of real English (the embedded corpus) as a text file."""
    from run_fixtures import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus") / "austen.txt")


@pytest.fixture(scope="session")
def tiny_run(tiny_corpus, tmp_path_factory) -> Path:
    """ROOT with ROOT/data (prepared, char tokenizer) and ROOT/run (a finished 4-step run with
    checkpoints at steps 2 and 4). Read-only: copy it (`run_copy`) before tampering."""
    from run_fixtures import tiny_cfg

    from xdlm.train.loop import train

    root = tmp_path_factory.mktemp("tiny")
    train(tiny_cfg(tiny_corpus, root / "data"), root / "run")
    return root


@pytest.fixture
def make_trainer(tiny_corpus, tiny_run, tmp_path):
    """make_trainer(*sets, run="run", resume=False): a `Trainer` of `tiny_cfg` with `sets` on
    `tiny_run`'s data, in tmp_path / run; every one made is closed at the end of the test."""
    from run_fixtures import tiny_cfg

    from xdlm.train.loop import Trainer

    made = []

    def make(*sets, run="run", resume=False):
        cfg = tiny_cfg(tiny_corpus, tiny_run / "data", *sets)
        made.append(Trainer(cfg, tmp_path / run, resume))
        return made[-1]

    yield make
    for trainer in made:
        trainer.close()


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of `tiny_run`'s run directory."""
    import shutil

    shutil.copytree(tiny_run / "run", tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def small_fs(tmp_path):
    """An empty 4 MB tmpfs mounted at a directory under tmp_path, for real full-disk tests
    (`run_fixtures.fill_disk`); skipped where mounting is not permitted (not root)."""
    import subprocess

    mount = tmp_path / "small_fs"
    mount.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip() or 'not root'}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def rank_0_of_2(tmp_path, monkeypatch):
    """A real gloo group of one process, the trainer told it is rank 0 of 2: DDP syncs and FSDP2
    shards as on 2 ranks, each collective spanning this one rank. What rank 0 computes (its
    strata of t, its gradient sync, its sharded save and resume) is checked; gradient scale and
    data split follow the declared 2 ranks. (Rank 1 cannot be played in a group of one: it
    would receive its own, undecided, precision.)"""
    import torch.distributed as dist

    from xdlm.collectives import DistContext
    from xdlm.train import loop

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    ctx = DistContext(0, 2, 0, torch.device("cpu"))
    monkeypatch.setattr(loop.D, "setup_distributed", lambda cfg, device: ctx)
    yield
    dist.destroy_process_group()
