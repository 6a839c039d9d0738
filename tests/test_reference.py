"""Parity with the original implementation, against the arrays it produced (../shared/reference)."""
import json
import os
import types

import numpy as np
import pytest
import torch

import checkpoints
import run_deepvoxels
import util
from conftest import require_reference
from data_util import UINT16_MAX
from evaluation import crop

SMALL = types.SimpleNamespace(img_sidelength=128, grid_dim=16, num_grid_feats=8, nf0=8, no_occlusion_net=False)


def _build_model(flags: types.SimpleNamespace, device: torch.device = torch.device("cpu")):
    return run_deepvoxels.build_networks(types.SimpleNamespace(**vars(flags), batchnorm_init="ones"), device)
NUM_POSES = 6
ATOL = 1e-4


def _manifest_model(manifest):
    cfg = manifest["config"]
    opt = types.SimpleNamespace(img_sidelength=cfg["img_sidelength"], grid_dim=cfg["grid_dim"],
                                num_grid_feats=cfg["num_grid_feats"], nf0=cfg["nf0"],
                                no_occlusion_net=not cfg["use_occlusion_net"])
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return _build_model(opt, torch.device("meta"))


@pytest.mark.parametrize("name", ["state_dict_default.json", "state_dict_no_occlusion.json"])
def test_state_dict_matches_manifest(reference_dir, name):
    with open(os.path.join(reference_dir, name)) as handle:
        manifest = json.load(handle)
    model, disc = _manifest_model(manifest)
    keys = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(keys) == list(manifest["model"])  # same keys, same order
    assert keys == manifest["model"]
    assert {k: list(v.shape) for k, v in disc.state_dict().items()} == manifest["discriminator"]
    assert util.count_parameters(model) == manifest["model_trainable_params"]
    assert util.count_parameters(disc) == manifest["discriminator_trainable_params"]
    for sub, count in manifest["model_submodule_trainable_params"].items():
        assert util.count_parameters(getattr(model, sub)) == count, sub
    state = model.state_dict(keep_vars=True)
    for alias, original in manifest["model_alias_keys"].items():
        assert state[alias] is state[original], alias
    assert sorted(k for k, _ in model.named_buffers() if k in keys) == sorted(manifest["model_buffer_keys"])


@pytest.fixture
def geometry(device):
    return run_deepvoxels.build_geometry(os.path.join(require_reference(), "small_intrinsics.txt"), SMALL.grid_dim,
                                         float(np.sqrt(3) / 2), device)


@pytest.fixture(scope="module")
def small_checkpoint():
    return checkpoints.load(os.path.join(require_reference(), "small_ckpt.pth"))


@pytest.fixture
def small_model(small_checkpoint, device):
    model, disc = _build_model(SMALL)
    model.load_state_dict(small_checkpoint["model"], strict=True)
    disc.load_state_dict(small_checkpoint["discriminator"], strict=True)
    return model.to(device).eval()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _on(t: torch.Tensor, device: torch.device) -> bool:
    """Whether ``t`` lives on ``device`` (``cuda`` means the current CUDA device)."""
    index = torch.cuda.current_device() if device.type == "cuda" and device.index is None else device.index
    return t.device.type == device.type and t.device.index == index


def test_geometry_meta_matches_original(reference_dir, geometry):
    ref = np.load(os.path.join(reference_dir, "projection.npz"))
    np.testing.assert_allclose(np.asarray(geometry.lifting_intrinsic), ref["lift_intrinsic"])
    np.testing.assert_allclose(_np(geometry.grid2world), ref["grid_origin"])
    assert geometry.near_plane == pytest.approx(float(ref["near_plane"]))
    assert geometry.voxel_size == pytest.approx(float(ref["voxel_size"]))
    assert geometry.depth_max == pytest.approx(float(ref["depth_max"]))
    assert geometry.frustum_depth == int(ref["frustrum_depth"])


@pytest.mark.parametrize("i", range(NUM_POSES))
def test_lifting_and_projection_indices(reference_dir, geometry, device, i):
    ref = np.load(os.path.join(reference_dir, "projection.npz"))
    pose = torch.from_numpy(ref[f"pose_{i}"]).to(device)
    lin, coords = geometry.lifting_indices(pose)
    assert _on(lin, device) and _on(coords, device)
    # Integer indices exactly; float32 coordinates to a few units in the last place of 64: they are differences
    # of terms up to the 64 px map size, and the transforms' multiply-adds are fused and ordered as the
    # device's kernels choose (seen: up to 2.1e-5 on an H200, also at 0.5; 1.1e-5 on an AVX-512 CPU).
    atol = 8 * float(np.spacing(np.float32(64)))
    np.testing.assert_array_equal(_np(lin), ref[f"lift_lin_ind_{i}"])
    np.testing.assert_allclose(_np(coords), ref[f"lift_coords_{i}"], atol=atol, rtol=0)
    lin, coords = geometry.projection_indices(pose)
    np.testing.assert_array_equal(_np(lin), ref[f"proj_lin_ind_{i}"])
    np.testing.assert_allclose(_np(coords), ref[f"proj_voxel_coords_{i}"], atol=atol, rtol=0)


def test_test_mode_renders_and_depths(reference_dir, geometry, small_model, device):
    ref = np.load(os.path.join(reference_dir, "forward_test.npz"))
    np.testing.assert_array_equal(_np(small_model.deepvoxels), ref["deepvoxels_buffer"])
    proj = [geometry.projection_indices(torch.from_numpy(ref[f"pose_{i}"]).to(device)) for i in range(NUM_POSES)]
    with torch.no_grad():
        inpainted = small_model.inpaint(small_model.deepvoxels)
        np.testing.assert_allclose(_np(inpainted), ref["inpainting_net_output"], atol=ATOL, rtol=0)
        images, depths = small_model(None, [p[0] for p in proj], [p[1] for p in proj])
    for i in range(NUM_POSES):
        assert _on(images[i], device) and _on(depths[i], device)
        np.testing.assert_allclose(_np(images[i]), ref[f"rendered_full_{i}"], atol=ATOL, rtol=0)
        np.testing.assert_allclose(_np(depths[i]), ref[f"depth_raw_{i}"], atol=ATOL, rtol=0)
        cropped = crop(images[i])
        np.testing.assert_allclose(_np(cropped), ref[f"rendered_cropped_{i}"], atol=ATOL, rtol=0)


def test_test_mode_renders_with_winograd_convolutions(reference_dir, geometry, small_checkpoint, device,
                                                      monkeypatch):
    """Test mode's fast paths on the CPU, with every 3x3 convolution through Winograd's F(2x2, 3x3) (by default
    only those with 256 input channels and more, which this small model does not have): the original's renders."""
    import performance
    if device.type != "cpu":
        pytest.skip("Winograd's convolutions are a CPU path")
    monkeypatch.setattr(performance, "WINOGRAD_MIN_IN_CHANNELS", 1)
    model, _ = _build_model(SMALL)
    model.load_state_dict(small_checkpoint["model"], strict=True)
    performance.enable(model, performance.FastPaths(channels_last_2d=True, winograd_conv2d=True, onednn_conv3d=True))
    assert sum(type(m) is performance.WinogradConv2d for m in model.rendering_net.modules()) >= 10
    ref = np.load(os.path.join(reference_dir, "forward_test.npz"))
    proj = [geometry.projection_indices(torch.from_numpy(ref[f"pose_{i}"])) for i in range(NUM_POSES)]
    with torch.no_grad():
        images, depths = model.eval()(None, [p[0] for p in proj], [p[1] for p in proj])
    for i in range(NUM_POSES):
        np.testing.assert_allclose(_np(images[i]), ref[f"rendered_full_{i}"], atol=ATOL, rtol=0)
        np.testing.assert_allclose(_np(depths[i]), ref[f"depth_raw_{i}"], atol=ATOL, rtol=0)


def test_occlusion_weights_and_rendering_input(reference_dir, geometry, small_model, device):
    ref = np.load(os.path.join(reference_dir, "forward_test.npz"))
    from projection import sample_frustum
    with torch.no_grad():
        inpainted = small_model.inpaint(small_model.deepvoxels)
        for i in (0, 3):
            lin, coords = geometry.projection_indices(torch.from_numpy(ref[f"pose_{i}"]).to(device))
            frustum = sample_frustum(inpainted, lin, coords, (32, 64, 64))
            weights, _ = small_model.occlusion_net(frustum)
            np.testing.assert_allclose(_np(weights), ref[f"occlusion_visibility_weights_{i}"], atol=ATOL, rtol=0)
            features = torch.mean(weights * frustum, dim=2)
            np.testing.assert_allclose(_np(features), ref[f"rendering_net_input_{i}"], atol=ATOL, rtol=0)


def test_train_mode_forward_in_eval(reference_dir, geometry, small_model, device):
    """One call with an input image: lifting, integration (the buffer is overwritten), inpainting, 2 views."""
    ref = np.load(os.path.join(reference_dir, "forward_train_eval.npz"))
    model = small_model
    np.testing.assert_array_equal(_np(model.deepvoxels), ref["deepvoxels_before"])
    lin, coords = geometry.lifting_indices(torch.from_numpy(ref["nearest_pose"]).to(device))
    proj = [geometry.projection_indices(torch.from_numpy(p).to(device)) for p in ref["target_poses"]]
    img = torch.from_numpy(ref["input_img"]).to(device)
    with torch.no_grad():
        feats = model.feature_extractor(img)
        np.testing.assert_allclose(_np(feats), ref["img_feats"], atol=ATOL, rtol=0)
        from projection import lift_features
        lifted = lift_features(feats, lin, coords, [SMALL.grid_dim] * 3)
        np.testing.assert_allclose(_np(lifted), ref["lifted_volume"], atol=ATOL, rtol=0)
        images, depths = model(img, [p[0] for p in proj], [p[1] for p in proj], lin, coords)
    np.testing.assert_allclose(_np(model.deepvoxels), ref["deepvoxels_after"], atol=ATOL, rtol=0)
    for i in range(2):
        np.testing.assert_allclose(_np(images[i]), ref[f"rendered_full_{i}"], atol=ATOL, rtol=0)
        np.testing.assert_allclose(_np(depths[i]), ref[f"depth_raw_{i}"], atol=ATOL, rtol=0)
        metric = run_deepvoxels.metric_depth(depths[i], geometry, SMALL.grid_dim)
        np.testing.assert_allclose(_np(metric), ref[f"depth_metric_{i}"], atol=ATOL, rtol=0)


def test_checkpoint_config_inferred_from_original_file(reference_dir):
    payload = checkpoints.load(os.path.join(reference_dir, "small_ckpt.pth"))
    assert set(payload) == {"model", "discriminator"}
    assert checkpoints.infer_model_flags(payload["model"]) == vars(SMALL)


@pytest.mark.parametrize("extra", [[], ["--save_memory"]], ids=["default", "save_memory"])
def test_cli_test_mode_writes_the_original_pngs(reference_dir, tmp_path, capsys, device, extra):
    """``--train_test test`` on the 6 reference poses: 16-bit renders and depth PNGs as the original wrote, with
    test mode's fast paths and with those of ``--save_memory``."""
    import shutil

    import data_util
    data = tmp_path / "test" / "small"
    (data / "pose").mkdir(parents=True)
    for i in range(NUM_POSES):
        shutil.copy(os.path.join(reference_dir, f"pose_{i}.txt"), data / "pose" / f"pose_{i}.txt")
    shutil.copy(os.path.join(reference_dir, "small_intrinsics.txt"), data / "intrinsics.txt")
    code = run_deepvoxels.main(["--train_test", "test", "--data_root", str(data), "--logging_root",
                                str(tmp_path / "logs"), "--checkpoint", os.path.join(reference_dir, "small_ckpt.pth"),
                                "--img_sidelength", "128", "--grid_dim", "16", "--num_grid_feats", "8", "--nf0", "8",
                                "--device", str(device)] + extra)
    assert code == 0
    assert "Average forward pass time over 6 examples" in capsys.readouterr().out
    ref = np.load(os.path.join(reference_dir, "forward_test.npz"))
    (out_dir,) = [os.path.dirname(p) for p in (tmp_path / "logs").rglob("img_00000.png") if "depth" not in str(p)]
    for i in range(NUM_POSES):
        png = data_util.read_image(os.path.join(out_dir, f"img_{i:05d}.png"))
        assert png.dtype == np.uint16 and png.shape == (118, 118, 3)
        diff = np.abs(png.astype(np.int64) - ref[f"test_png_rgb_uint16_{i}"].astype(np.int64))
        assert diff.max() <= 1e-3 * UINT16_MAX
        depth = data_util.read_image(os.path.join(out_dir, "depth", f"img_{i:05d}.png"))
        diff = np.abs(depth.astype(np.int64) - ref["test_depth_png_uint16"][i, ..., 0].astype(np.int64))
        assert diff.max() <= 1e-3 * UINT16_MAX
