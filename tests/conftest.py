import os

import pytest

# Tests never talk to W&B servers and never wait at a login prompt.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def run_cli(capsys):
    """Run ``flowdiff ARGS`` in-process; return (exit code, stdout, stderr)."""
    from flowdiff.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else 1
        out, err_text = capsys.readouterr()
        return code, out, err_text

    return run


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests' tensors are small: intra-op threads gain nothing, and on a busy 2-core machine
    OpenMP threads waiting on each other can make them ~100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
