"""Photos or a video to a dataset (tools/capture.py): structure from motion with pycolmap on rendered views of a
textured object, whose true cameras the reconstruction must recover; the splits; frames from a video; the
refusals, which leave nothing behind."""
import os

import numpy as np
import pytest

import data_util
from tools import capture, synthetic

OBJECT = "crate"  # multi-scale noise texture: the checkered objects give SIFT too few distinct features
NUM_VIEWS = 32
SIDE = 160
RADIUS = 1.6


def ring_poses(num_views):
    """Cameras around the object at 20..50 degrees elevation, a small step apart (as someone walking round)."""
    azimuths = np.arange(num_views) * 360.0 / num_views
    elevations = 35.0 + 15.0 * np.sin(np.deg2rad(3 * azimuths))
    return np.stack([data_util.look_at(data_util.spherical_position(a, e, RADIUS))
                     for a, e in zip(azimuths, elevations)])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    poses = ring_poses(NUM_VIEWS)
    f = synthetic.synthetic_focal(SIDE)
    for i, pose in enumerate(poses):
        data_util.write_png(folder / f"IMG_{i:03d}.png",
                            synthetic.render_view(OBJECT, pose, f, SIDE / 2, SIDE / 2, SIDE, SIDE))
    return str(folder), poses


@pytest.fixture(scope="module")
def reconstructed(photos, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("capture") / "dataset")
    assert capture.main(["--images", photos[0], "--out", out, "--object", "crate", "--resolution", "128",
                         "--sfm_threads", "1"]) == 0  # the same reconstruction every run
    return out


def similarity(src, dst):
    """(scale, rotation, translation) with dst ~ scale * rotation @ src + translation (Umeyama, least squares)."""
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    a, b = src - mu_s, dst - mu_d
    u, d, vt = np.linalg.svd(b.T @ a / len(src))
    sign = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(d) @ sign) / a.var(axis=0).sum()
    return scale, rotation, mu_d - scale * rotation @ mu_s


def test_split_indices_hold_out_every_eighth_view():
    splits = capture.split_indices(20, 8, 3)
    assert splits["test"] == [0, 8, 16]
    assert len(splits["validation"]) == 3 and not set(splits["validation"]) & set(splits["test"])
    assert sorted(sum(splits.values(), [])) == list(range(20))
    assert capture.split_indices(5, 0, 0) == {"train": [0, 1, 2, 3, 4], "validation": [], "test": []}


def test_photos_to_dataset_recovers_the_true_cameras(photos, reconstructed):
    """No cameras given: the reconstruction, mapped onto the true world by one similarity, puts every
    registered camera where it was rendered from."""
    _, true_poses = photos
    views = {}  # photo index -> dataset cam2world
    for split in capture.SPLITS:
        folder = os.path.join(reconstructed, split, "crate")
        names = [line.split()[1] for line in open(os.path.join(folder, "source_images.txt"))]
        poses = [data_util.load_pose(p).astype(np.float64) for p in data_util.list_poses(os.path.join(folder, "pose"))]
        assert len(names) == len(poses) == len(data_util.glob_imgs(os.path.join(folder, "rgb")))
        assert os.path.isfile(os.path.join(folder, "world_transform.txt"))
        views.update({int(name[4:7]): pose for name, pose in zip(names, poses)})
    assert len(views) >= 0.9 * NUM_VIEWS
    order = sorted(views)
    # Every 8th registered view (by name) is a test view; 3 of the others validate.
    test_names = [line.split()[1] for line in open(os.path.join(reconstructed, "test", "crate", "source_images.txt"))]
    assert test_names == [f"IMG_{order[i]:03d}.png" for i in range(0, len(order), 8)]
    assert len(data_util.list_poses(os.path.join(reconstructed, "validation", "crate", "pose"))) == 3

    centres = np.stack([views[i][:3, 3] for i in order])
    true_centres = np.stack([true_poses[i][:3, 3] for i in order])
    scale, rotation, shift = similarity(centres, true_centres)
    centre_errors = np.linalg.norm(scale * centres @ rotation.T + shift - true_centres, axis=1) / RADIUS
    angles = [np.degrees(np.arccos(np.clip((np.trace(true_poses[i][:3, :3].T @ rotation @ views[i][:3, :3]) - 1) / 2,
                                           -1, 1))) for i in order]
    # Of the camera distance, and degrees. The fixture runs structure from motion on one thread, so these are the
    # same every run (with several threads they vary with the threads' order); a wrong camera convention is off
    # by tens of percent and tens of degrees.
    assert centre_errors.mean() < 0.02 and centre_errors.max() < 0.04, centre_errors
    assert max(angles) < 2.0  # degrees

    # The grid holds the object: the crate's corners, mapped into the dataset world, lie inside it.
    corners = np.array([[x, y, z] for x in (-0.25, 0.25) for y in (-0.25, 0.25) for z in (-0.25, 0.25)])
    in_dataset = (corners - shift) @ rotation / scale
    assert np.abs(in_dataset).max() < 0.5
    assert os.path.isdir(os.path.join(reconstructed, "sparse"))  # the model, for from_colmap
    assert not [n for n in os.listdir(os.path.dirname(reconstructed)) if "partial" in n]


def test_reconstructed_dataset_loads_for_training(reconstructed):
    import dataio
    views = dataio.NovelViewTriplets(os.path.join(reconstructed, "train", "crate"), 128)
    assert tuple(views.all_views[0]["gt_rgb"].shape) == (3, 128, 128)


def test_summary_says_what_was_done(photos, tmp_path, capsys):
    out = str(tmp_path / "d")
    assert capture.main(["--images", photos[0], "--out", out, "--resolution", "64", "--test_every", "0",
                         "--num_val", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"of {NUM_VIEWS} images" in printed and "reprojection error" in printed
    assert "grid: centre" in printed and "split:" in printed and "0 test" in printed
    assert sorted(os.listdir(out)) == ["sparse", "train"]


def write_video(path, frames, fps):
    import imageio_ffmpeg
    height, width = frames[0].shape[:2]
    writer = imageio_ffmpeg.write_frames(path, (width, height), fps=fps, macro_block_size=1)
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def test_video_frames_are_taken_at_the_chosen_rate(tmp_path):
    # 20 frames at 10 fps, each with its number as a gray level: 2 s of video.
    frames = [np.full((32, 48, 3), 10 * k, dtype=np.uint8) for k in range(20)]
    video = str(tmp_path / "clip.mp4")
    write_video(video, frames, fps=10)
    sources = capture.extract_frames(video, str(tmp_path / "frames"), fps=2.5)
    assert list(sources)[:5] == [f"frame_{k:05d}.png" for k in range(5)] and len(sources) in (5, 6)
    assert sources["frame_00002.png"] == "clip.mp4#t=0.800"
    levels = [data_util.read_image(tmp_path / "frames" / name).mean() for name in list(sources)[:5]]
    # Frame k of the 2.5 fps stream is source frame 4 k, to within one source frame (ffmpeg's fps filter
    # rounds timestamps), so the gray levels step by 40 and start within 10 of 0.
    np.testing.assert_allclose(np.diff(levels), 40.0, atol=6.0)
    assert levels[0] <= 10.0 + 6.0


def _refused(capsys, tmp_path, out, *words):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(tmp_path) if "partial" in n]


def test_refusals(photos, tmp_path, capsys):
    out = str(tmp_path / "out")
    few = tmp_path / "few"
    few.mkdir()
    for i in range(3):
        data_util.write_png(few / f"{i}.png", np.zeros((16, 16, 3), np.uint8))
    assert capture.main(["--images", str(few), "--out", out]) == 2
    _refused(capsys, tmp_path, out, str(few), "3 images", f"at least {capture.MIN_IMAGES}")

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i in range(capture.MIN_IMAGES):
        data_util.write_png(mixed / f"{i}.png", np.zeros((16, 16 if i else 20, 3), np.uint8))
    assert capture.main(["--images", str(mixed), "--out", out]) == 2
    _refused(capsys, tmp_path, out, "mixed image sizes", "0.png")

    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video")
    assert capture.main(["--video", str(broken), "--out", out]) == 2
    _refused(capsys, tmp_path, out, str(broken), "cannot decode")


def test_refuses_when_fewer_than_half_register(photos, tmp_path, capsys):
    """Five neighbouring views of the object among seven images of noise: at most 5 of 12 can register."""
    folder = tmp_path / "mostly_noise"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for i in range(5):
        os.symlink(os.path.join(photos[0], f"IMG_{i:03d}.png"), folder / f"a_{i}.png")
    for i in range(7):
        data_util.write_png(folder / f"b_{i}.png", rng.randint(0, 256, size=(SIDE, SIDE, 3)).astype(np.uint8))
    out = str(tmp_path / "out")
    assert capture.main(["--images", str(folder), "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "of 12 images registered" in err or "registered no images" in err
    assert not os.path.exists(out) and not [n for n in os.listdir(tmp_path) if "partial" in n]
