"""torchrun-style data parallelism: 2 CPU processes with the gloo backend."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import checkpoints
import distributed
import options
import run_deepvoxels
from tools import synthetic

TINY = ["--img_sidelength", "128", "--grid_dim", "8", "--num_grid_feats", "4", "--nf0", "4", "--device", "cpu"]
WORLD = 2
STEPS = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, argv: list, port: int, out_dir: str) -> None:
    """One torchrun rank: the environment torchrun would set, then the training entry point."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    opt = options.parse_args(argv)
    dist_ctx, device = distributed.setup(opt.device)
    assert dist_ctx.world == WORLD and dist_ctx.rank == rank
    result = run_deepvoxels.train(opt, device, dist_ctx)
    torch.save({"model": result.model.state_dict(), "discriminator": result.discriminator.state_dict(),
                "step": result.step, "log_dir": result.log_dir}, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_data")
    synthetic.make_synthetic_dataset(str(root), "cube", resolution=128, num_train=6, num_val=2, num_test=3, seed=1)
    return root


@pytest.mark.slow
def test_two_gloo_ranks_stay_identical_and_checkpoint_renders(dataset, tmp_path, capsys):
    logs = tmp_path / "logs"
    argv = ["--train_test", "train", "--data_root", str(dataset / "train" / "cube"), "--logging_root", str(logs),
            "--max_steps", str(STEPS), "--val_every", "0", *TINY]
    mp.start_processes(_worker, args=(argv, _free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [s["step"] for s in states] == [STEPS, STEPS]
    assert states[0]["log_dir"] and not states[1]["log_dir"]  # only rank 0 writes
    for net in ("model", "discriminator"):
        ref, other = states[0][net], states[1][net]
        assert ref.keys() == other.keys()
        for key in ref:
            assert torch.equal(ref[key], other[key]), f"{net}.{key} differs between ranks"
    # The grid really moved (the ranks integrated different views and averaged them).
    assert states[0]["model"]["deepvoxels"].abs().sum() > 0

    # Rank 0's checkpoint has the single-process format and renders in single-process test mode.
    ckpts = checkpoints.list_checkpoints(states[0]["log_dir"])
    assert ckpts and ckpts[-1][0] == STEPS
    payload = torch.load(ckpts[-1][1], weights_only=True)
    for key, value in states[0]["model"].items():
        assert torch.equal(payload["model"][key], value)
    code = run_deepvoxels.main(["--train_test", "test", "--data_root", str(dataset / "test" / "cube"),
                                "--logging_root", str(logs), "--checkpoint", ckpts[-1][1], *TINY])
    assert code == 0
    assert "PSNR" in capsys.readouterr().out


def test_without_torchrun_the_run_is_not_distributed(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    opt = options.parse_args(["--train_test", "train", "--data_root", "x", "--logging_root", "y", *TINY])
    dist_ctx, device = distributed.setup(opt.device)
    assert not dist_ctx.enabled and dist_ctx.is_main and device.type == "cpu"
    assert not torch.distributed.is_initialized()
