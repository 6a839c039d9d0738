"""The command line: grouped help, model flags read from a checkpoint in test mode, the 1.0 initialisation."""
import types

import pytest
import torch
from torch import nn

import checkpoints
import options
import performance
import run_deepvoxels
import util
from tools.synthetic import make_synthetic_dataset

TINY = ["--img_sidelength", "128", "--grid_dim", "8", "--num_grid_feats", "4", "--nf0", "4", "--device", "cpu"]
GROUPS = ["required", "model (test mode reads these from the checkpoint; given, they must match it)", "schedule",
          "checkpoints and resume", "validation and test", "live viewer (python -m viewer shows a checkpoint)",
          "performance", "logging"]


def test_help_is_grouped_and_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        options.parse_args(["--help"])
    text = capsys.readouterr().out
    positions = [text.index(f"\n{group}:\n") for group in GROUPS]
    assert positions == sorted(positions)
    assert "(default: None)" not in text and "default: default" not in text
    assert text.count("(default: 512)") == 1 and text.count("(default: 0.0004)") == 1
    assert "{train,test}" in text and "{off,bf16,fp16}" in text
    assert text.rstrip().splitlines()[-1].startswith("Flags can also come from a YAML file")
    assert "cpu_allocator" not in text  # removed: accepted only to say so


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step model with grid 8, 4 features, nf0 4, and its test split."""
    root = tmp_path_factory.mktemp("options")
    make_synthetic_dataset(str(root / "data"), "cube", resolution=128, num_train=6, num_val=1, num_test=2, seed=4)
    argv = ["--train_test", "train", "--data_root", str(root / "data" / "train" / "cube"), "--logging_root",
            str(root / "logs"), "--max_steps", "2", "--val_every", "0", *TINY]
    assert run_deepvoxels.main(argv) == 0
    return types.SimpleNamespace(root=root, ckpt=checkpoints.newest_checkpoint(str(root / "logs")),
                                 test_root=str(root / "data" / "test" / "cube"))


def _test_argv(trained, *extra):
    return ["--train_test", "test", "--data_root", trained.test_root, "--logging_root", str(trained.root / "out"),
            "--checkpoint", trained.ckpt, "--device", "cpu", *extra]


def test_test_mode_reads_the_model_flags_from_the_checkpoint(trained, capsys):
    assert run_deepvoxels.main(_test_argv(trained)) == 0  # no model flags given: 512 px, grid 32 would not load
    out = capsys.readouterr().out
    assert "model flags from the checkpoint: img_sidelength 128, grid_dim 8, num_grid_feats 4, nf0 4" in out
    assert "PSNR" in out


def test_test_mode_refuses_flags_that_contradict_the_checkpoint(trained, tmp_path, capsys):
    assert run_deepvoxels.main(_test_argv(trained, "--grid_dim", "16")) == 2
    err = capsys.readouterr().err
    assert "grid_dim 8 in the checkpoint, 16 given" in err and err.count("\n") == 1
    config = tmp_path / "run.yaml"
    config.write_text("nf0: 8\n")  # a config file's value counts as given
    assert run_deepvoxels.main(_test_argv(trained, "--config", str(config))) == 2
    err = capsys.readouterr().err
    assert "nf0 4 in the checkpoint, 8 given" in err and err.count("\n") == 1
    assert run_deepvoxels.main(_test_argv(trained, "--grid_dim", "8", "--nf0", "4")) == 0  # agreeing is fine


def test_flags_of_an_original_checkpoint_come_from_its_tensors(trained):
    payload = checkpoints.load(trained.ckpt)
    original = {"model": payload["model"], "discriminator": payload["discriminator"]}  # no stored flags
    opt = options.parse_args(_test_argv(trained))
    assert checkpoints.take_model_flags(trained.ckpt, original, opt) == {
        "img_sidelength": 128, "grid_dim": 8, "num_grid_feats": 4, "nf0": 4, "no_occlusion_net": False}


def _networks(init: str):
    opt = options.parse_args(["--train_test", "train", "--data_root", "x", "--logging_root", "y", *TINY,
                              "--batchnorm_init", init])
    torch.manual_seed(0)
    return run_deepvoxels.build_networks(opt, torch.device("cpu"))


def test_batchnorm_scales_start_as_pytorch_1_0_drew_them():
    """'uniform' (the default) draws every BatchNorm scale in [0, 1) where 1.0 drew it, during construction:
    the layers built before the first BatchNorm are the same as with 'ones', those after it are not (the draw
    took random numbers from the same stream). Shifts start at 0 either way, and BatchNorm is modern again
    after the build."""
    assert options.parse_args(["--train_test", "train", "--data_root", "x", "--logging_root", "y"]
                              ).batchnorm_init == "uniform"
    uniform, ones = _networks("uniform"), _networks("ones")
    for net_u, net_o in zip(uniform, ones):
        norms_u = [m for m in net_u.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        norms_o = [m for m in net_o.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms_u and all(((m.weight >= 0) & (m.weight < 1)).all() for m in norms_u)
        assert all(m.weight.unique().numel() > 1 or m.weight.numel() == 1 for m in norms_u)
        assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms_o)
        assert all(not m.bias.any() for m in norms_u + norms_o)
    first_u, first_o = uniform[0].feature_extractor.net[0].downs[0].net, ones[0].feature_extractor.net[0].downs[0].net
    assert torch.equal(first_u[1].weight, first_o[1].weight)  # built before any BatchNorm
    assert not torch.equal(first_u[5].weight, first_o[5].weight)  # built after the first one
    assert torch.equal(nn.BatchNorm2d(3).weight, torch.ones(3))


def test_model_flags_are_checked_before_anything_is_built():
    for flags, culprit in ((["--img_sidelength", "96"], "--img_sidelength 96"), (["--grid_dim", "6"], "--grid_dim 6"),
                           (["--nf0", "1"], "--nf0 1")):
        with pytest.raises(util.UsageError, match=culprit):
            options.parse_args(["--train_test", "train", "--data_root", "x", "--logging_root", "y", *flags])


def test_view_batch_zero_is_the_device_default_and_below_zero_is_one_line():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert [performance.views_per_forward(0, cpu, side) for side in (128, 256, 512, 1024)] == [8, 8, 2, 1]
    assert performance.views_per_forward(0, gpu, 512) == performance.VIEWS_PER_FORWARD == 8
    assert performance.views_per_forward(3, cpu, 512) == 3  # an explicit --view_batch is kept
    base = ["--train_test", "train", "--data_root", "x", "--logging_root", "y"]
    assert options.parse_args(base).view_batch == 0
    with pytest.raises(util.UsageError, match=r"--view_batch -1: must be 0"):
        options.parse_args([*base, "--view_batch", "-1"])
