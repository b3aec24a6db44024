"""Audio2Video (anim_lab.pipelines.audio2video, ``anim-lab audio2video``, scripts/eval_lipsync.py).

The mesh path is checked on the toy world's exact ground truth (the clip's own landmarks, drawn), the template
head pose against a plain loop, the frame count and the audio track end to end on tiny random models (every
weight nonzero), and every bad input of the command (a clear message, nothing written)."""

import subprocess

import numpy as np
import PIL.Image
import pytest
import skimage.data
import soundfile
import torch
from test_audio2mesh import MICRO_W2V, randomize
from test_pipeline import tiny_pipeline

import anim_lab
from anim_lab import audio as A
from anim_lab import cli, retarget, toy
from anim_lab import video as V
from anim_lab.audio2mesh import Audio2Mesh
from anim_lab.errors import InputError
from anim_lab.pipelines import audio2video as a2v
from anim_lab.toy.cases import toy_landmarks_3d
from anim_lab.toy.renderer import Expression, HeadPose, rotation_matrix

torch.set_num_threads(1)
SIZE = 64  # the tiny pipeline's size
POSE = HeadPose(yaw=12, pitch=-5, roll=4, tx=0.02, ty=-0.01, scale=1.05)


def speech_like(seconds: float, rate: int = A.SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """(N,) a syllable-rate amplitude-modulated tone plus noise: audio with something to follow."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return (0.3 * envelope * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(len(t))).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def talking():
    """A toy identity speaking a sentence with a still head in POSE: its exact mesh (neutral, offsets) and
    the landmarks the renderer gives every frame (computed from the expressions, not from the offsets)."""
    identity = toy.identity_from_seed(3)
    mesh = toy.talking_mesh(identity, toy.synthesize("Bob spoke softly."), 25.0)
    truth = np.stack(
        [
            toy_landmarks_3d(
                identity,
                POSE,
                Expression(mouth_open=float(j), lip_round=float(r), lip_press=float(c), lip_spread=float(s)),
                128,
            )
            for j, r, c, s in mesh.visemes
        ]
    )  # (F, 478, 3)
    reference = toy_landmarks_3d(identity, POSE, Expression(), 128)  # (478, 3) the neutral face
    return mesh, truth, reference


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny pipeline and a tiny Audio2Mesh (micro wav2vec2), every weight random and nonzero, saved."""
    d = tmp_path_factory.mktemp("a2v")
    tiny_pipeline().save_pretrained(d / "weights")
    torch.manual_seed(0)
    mesh = randomize(Audio2Mesh(num_vertices=478, latent_dim=8, encoder_config=MICRO_W2V, fps=25.0), 1)
    with torch.no_grad():
        mesh.out_fn.weight.mul_(0.05)  # offsets of a few hundredths of a template unit: a mouth's motion
        mesh.out_fn.bias.mul_(0.05)
    mesh.save_pretrained(d / "audio2mesh", safe_serialization=True)
    img = skimage.data.astronaut()
    PIL.Image.fromarray(img).save(d / "ref.png")
    return d


# --- (a) offsets -> canonical -> projection, on the toy world's ground truth --------------------------------
def test_ground_truth_offsets_give_the_clips_own_pose_images(talking):
    mesh, truth, reference = talking
    out = a2v.audio_to_poses(
        None, mesh.audio, reference_xyz=reference, size=(128, 128), offsets=mesh.offsets, neutral=mesh.neutral
    )
    assert out.landmarks.shape == truth[..., :2].shape == (mesh.num_frames, 478, 2)
    np.testing.assert_allclose(out.landmarks, truth[..., :2], atol=1e-3)  # pixels
    drawn = retarget.pose_images(truth[..., :2], 128)  # what Video2Pose draws from the clip's landmarks
    assert (out.pose_images != drawn).any(-1).mean() < 1e-3
    # the mouth really moves: the frames differ from the reference's own drawing
    still = retarget.pose_images(reference[None, :, :2], 128)[0]
    assert (out.pose_images != still).any(axis=(1, 2, 3)).mean() > 0.5


def test_offsets_without_the_neutral_mesh_are_taken_as_canonical(talking):
    """Real use: the identity's own neutral mesh is unknown, so the offsets' size is taken as it is; on a toy
    identity that is off by the identity's size against the template (a few percent of the motion)."""
    mesh, truth, reference = talking
    out = a2v.audio_to_poses(None, mesh.audio, reference_xyz=reference, size=(128, 128), offsets=mesh.offsets)
    error = np.abs(out.landmarks - truth[..., :2]).max()
    assert 1e-3 < error < 0.25  # pixels


def test_the_canonical_frame_is_checked(talking):
    mesh, _, reference = talking
    with pytest.raises(InputError, match="not in the template's frame"):
        a2v.offsets_to_canonical(mesh.offsets, reference)  # image-space points, not canonical ones
    with pytest.raises(InputError, match="not template units"):
        a2v.offsets_to_canonical(mesh.offsets * 100, retarget.template_landmarks())  # centimetres, say
    fitted = retarget.fit_head_pose(reference)
    offsets_468 = a2v.offsets_to_canonical(mesh.offsets[:, :468] * 0.01, fitted.to_canonical(reference))
    assert offsets_468.shape == (mesh.num_frames, 478, 3) and not offsets_468[:, 468:].any()


def plain_pose_loop(reference, offsets, poses, size=128):
    """The landmarks of the reference's canonical mesh + offsets, posed frame by frame with ``poses`` (T, 6)
    relative to the first, added to the reference's pose, projected orthographically: written as a loop."""
    fit = retarget.fit_head_pose(reference)
    canonical = fit.to_canonical(reference)
    pivot = retarget.HEAD_PIVOT
    first = poses[0]
    out = []
    for x_offset, pose in zip(offsets, poses, strict=True):
        rot = rotation_matrix(*(fit.euler + pose[:3] - first[:3]))
        scale = fit.scale * pose[5] / first[5]
        shift = np.array([(pose[3] - first[3]) * size, -(pose[4] - first[4]) * size, 0.0])
        points = scale * (canonical + x_offset - pivot) @ rot.T + fit.point(pivot[None])[0] + shift
        out.append(points[:, :2] * np.array([1.0, -1.0]))  # face frame -> image pixels
    return np.stack(out)


# --- (f) the template head pose against a plain loop --------------------------------------------------------
def test_template_pose_matches_a_plain_loop(talking):
    mesh, _, reference = talking
    rng = np.random.default_rng(0)
    template = np.concatenate(
        [rng.uniform(-10, 10, (5, 3)), rng.uniform(-0.03, 0.03, (5, 2)), rng.uniform(0.9, 1.1, (5, 1))], 1
    )  # (T, 6) yaw, pitch, roll, tx, ty, scale
    out = a2v.audio_to_poses(
        None,
        mesh.audio,
        reference_xyz=reference,
        size=(128, 128),
        offsets=mesh.offsets,
        neutral=mesh.neutral,
        pose="template",
        template=template,
    )
    cycle = 2 * len(template) - 2  # forward, then backward without the two ends
    tiled = []
    for i in range(mesh.num_frames):
        k = i % cycle
        tiled.append(template[k if k < len(template) else cycle - k])
    np.testing.assert_allclose(out.landmarks, plain_pose_loop(reference, out.offsets, tiled), atol=1e-3)
    # a template that does not move holds the reference's pose
    held = a2v.audio_to_poses(
        None,
        mesh.audio,
        reference_xyz=reference,
        size=(128, 128),
        offsets=mesh.offsets,
        pose="template",
        template=np.repeat(template[:1], 4, 0),
    )
    ref_pose = a2v.audio_to_poses(
        None, mesh.audio, reference_xyz=reference, size=(128, 128), offsets=mesh.offsets
    )
    np.testing.assert_allclose(held.landmarks, ref_pose.landmarks, atol=1e-4)


def test_audio2pose_head_motion_matches_a_plain_loop(talking):
    from test_audio2mesh import POSE as POSE_CONFIG

    from anim_lab.audio2pose import Audio2Pose, audio_pose_sequence

    mesh, _, reference = talking
    model = randomize(Audio2Pose(**POSE_CONFIG, fps=25.0), 3)
    with torch.no_grad():  # the 6th pose entry is a size factor: keep it near 1 (positive)
        model.pose_map_r.weight[5].mul_(0.01)
        model.pose_map_r.bias[5] = 1.0
        model.pose_map_r.weight[:3].mul_(30.0)  # angles of several degrees
        model.pose_map_r.weight[3:5].mul_(0.1)  # shifts of a few percent of the frame
    audio = mesh.audio[:8000]  # 0.5 s: 13 frames at 25 fps
    out = a2v.audio_to_poses(
        None,
        audio,
        reference_xyz=reference,
        size=(128, 128),
        offsets=mesh.offsets[:13],
        neutral=mesh.neutral,
        pose="audio2pose",
        audio2pose=model,
        fps=25.0,
        id_seed=2,
    )
    values = torch.from_numpy(A.normalize(audio))[None]  # (1, N)
    poses = audio_pose_sequence(model, values, 13, 2, fps=25.0)  # (13, 6): chunks, halved angles, smoothed
    assert (poses[:, 5] > 0).all() and np.ptp(poses[:, :3], axis=0).max() > 0.01  # the head moves
    np.testing.assert_allclose(out.landmarks, plain_pose_loop(reference, out.offsets, poses), atol=1e-3)


# --- (b) Audio2Mesh's input, and the frame count end to end -------------------------------------------------
def test_mesh_offsets_are_the_models_own_output(models):
    mesh = Audio2Mesh.from_pretrained(models / "audio2mesh").eval()
    audio = speech_like(0.5)
    got = a2v.mesh_offsets(mesh, audio, 13)
    with torch.no_grad():
        values = (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)  # the extractor's normalisation
        want = mesh(torch.from_numpy(values.astype(np.float32))[None], 13)[0].double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert np.abs(got).max() > 0
    logmel = randomize(Audio2Mesh(num_vertices=478, latent_dim=8, feature_dim=80), 2)
    feats = torch.from_numpy(A.log_mel(audio, num_frames=13))[None]
    with torch.no_grad():
        np.testing.assert_allclose(a2v.mesh_offsets(logmel, audio, 13), logmel(features=feats)[0].double())


@pytest.mark.parametrize("seconds, fps", [(0.3, 25.0), (0.35, 30.0)])
def test_frame_count_is_ceil_of_seconds_times_fps(models, seconds, fps):
    identity = toy.identity_from_seed(5)
    image, _ = toy.render(identity, POSE, Expression(), size=SIZE)
    pipe = tiny_pipeline()
    mesh = Audio2Mesh.from_pretrained(models / "audio2mesh").eval()
    audio = speech_like(seconds)
    out = a2v.audio_to_video(
        pipe,
        mesh,
        image,
        audio,
        fps=fps,
        reference_xyz=toy_landmarks_3d(identity, POSE, Expression(), SIZE),
        num_inference_steps=1,
        context_frames=4,
        context_overlap=1,
        generator=torch.Generator().manual_seed(0),
    )
    frames = int(np.ceil(seconds * fps))
    assert frames == A.frame_count(len(audio), fps)
    assert out.frames.shape == out.pose_images.shape == (frames, SIZE, SIZE, 3)
    assert out.frames.dtype == np.uint8 and out.landmarks.shape == (frames, 478, 2)
    assert np.ptp(out.landmarks[:, 14, 1]) > 0  # Audio2Mesh moved the lower lip
    # (e) the frames are the pipeline's own on these pose images, in its context windows
    direct = pipe(
        image,
        list(out.pose_images),
        num_inference_steps=1,
        context_frames=4,
        context_overlap=1,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).frames[0]
    np.testing.assert_array_equal(out.frames, (direct * 255).round().astype(np.uint8))


def test_audio_of_any_layout_and_rate_is_read_as_16_khz_mono(talking):
    mesh, _, reference = talking
    kw = dict(reference_xyz=reference, size=(128, 128), neutral=mesh.neutral, fps=25.0)
    mono = speech_like(0.4)
    stereo_8k = np.stack([mono[::2], mono[::2]], 1)  # (N/2, 2) at 8 kHz
    out = a2v.audio_to_poses(None, stereo_8k, sample_rate=8000, offsets=mesh.offsets[:10], **kw)
    np.testing.assert_allclose(out.audio, A.resample(mono[::2], 8000), atol=1e-6)
    assert len(out.landmarks) == 10 == A.frame_count(len(out.audio), 25.0)
    for bad, match in ((np.zeros(16000), "silent"), (mono[:500], "shorter than one frame"), ([], "empty")):
        with pytest.raises(InputError, match=match):
            a2v.audio_to_poses(None, bad, offsets=mesh.offsets[:10], **kw)


def test_landmarks_override_draws_them_as_they_are(talking):
    mesh, truth, _ = talking
    out = a2v.audio_to_poses(None, mesh.audio, landmarks=truth[..., :2], size=(128, 128))
    np.testing.assert_array_equal(out.pose_images, retarget.pose_images(truth[..., :2], 128))
    with pytest.raises(InputError, match="F = "):
        a2v.audio_to_poses(None, mesh.audio, landmarks=truth[:-1, :, :2], size=(128, 128))


# --- (c) the command end to end: frames, the audio track, the tag -------------------------------------------
def decoded_audio_seconds(path, tmp_path) -> float:
    wav = tmp_path / "back.wav"
    cmd = [V.ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(path), "-map", "0:a:0", str(wav)]
    subprocess.run(cmd, check=True)
    data, rate = soundfile.read(str(wav))
    return len(data) / rate


def base_args(models, out, *extra):
    return [
        "audio2video",
        "--ref",
        str(models / "ref.png"),
        "--out",
        str(out),
        "--weights",
        str(models / "weights"),
        "--audio2mesh",
        str(models / "audio2mesh"),
        "--steps",
        "1",
        "--context-frames",
        "4",
        "--context-overlap",
        "1",
        "--no-progress",
        *extra,
    ]


def test_command_writes_the_video_with_its_audio(models, tmp_path, capsys):
    """8-kHz stereo speech: mixed to mono and resampled (each with a note); the mp4 has ceil(seconds x fps)
    frames and the speech as its audio track, cut to its length; a second run replaces its own output."""
    audio = speech_like(0.5, rate=8000)
    stereo = np.stack([audio, 0.5 * audio], 1)  # (N, 2)
    soundfile.write(tmp_path / "speech.wav", stereo, 8000)
    out = tmp_path / "talk.mp4"
    argv = base_args(models, out, "--audio", str(tmp_path / "speech.wav"))
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "mixed to mono" in err and "8000 Hz: resampled" in err
    frames, fps = V.read_video(out)
    assert fps == 25 and len(frames) == 13 == A.frame_count(8000, 25)  # 0.5 s at 25 fps
    assert V.has_audio(out) and abs(decoded_audio_seconds(out, tmp_path) - 0.5) < 0.03
    assert cli.AUDIO2VIDEO_TAG in V.probe(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.wav", "speech.wav", "talk.mp4"]
    before = out.read_bytes()
    assert cli.main([*argv, "--seed", "7", "--pose", "template"]) == 0  # its own file: replaced
    assert out.read_bytes() != before


def test_command_speaks_text(models, tmp_path):
    out = tmp_path / "said.mp4"
    assert cli.main(base_args(models, out, "--text", "Hi.", "--fps", "10")) == 0
    frames, fps = V.read_video(out)
    assert fps == 10 and len(frames) == A.frame_count(len(toy.synthesize("Hi.").audio_16k()), 10)
    assert V.has_audio(out)


# --- (d) every bad input: a clear message, nothing written -------------------------------------------------
def write_wav(path, samples, rate=16000):
    soundfile.write(str(path), np.asarray(samples, np.float32), rate)
    return path


def refused(argv, capsys, match, folder):
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    message = capsys.readouterr().err
    assert err.value.code == 2 and "Traceback" not in message, message
    assert __import__("re").search(match, message), message
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written, nothing removed


def test_bad_audio_is_refused(models, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    (tmp_path / "empty.wav").write_bytes(b"")
    cases = {
        "missing.wav": ("no such audio file", None),
        "empty.wav": (r"is empty \(0 bytes\)", None),
        "silent.wav": ("is silent", np.zeros(16000)),
        "short.wav": ("shorter than one video frame", speech_like(0.03)),  # 30 ms < 40 ms
        "noise.txt": ("not a readable audio file", None),
    }
    (tmp_path / "noise.txt").write_text("not audio")
    for name, (match, samples) in cases.items():
        if samples is not None:
            write_wav(tmp_path / name, samples)
        refused(base_args(models, out, "--audio", str(tmp_path / name)), capsys, match, tmp_path)


def test_bad_arguments_are_refused(models, tmp_path, capsys):
    wav = write_wav(tmp_path / "speech.wav", speech_like(0.3))
    out = tmp_path / "out.mp4"
    refused(base_args(models, out, "--audio", str(wav), "--text", "Hello."), capsys, "not both", tmp_path)
    refused(base_args(models, out), capsys, "give the speech", tmp_path)
    refused(
        base_args(models, tmp_path / "out.gif", "--audio", str(wav)), capsys, r"must end in \.mp4", tmp_path
    )
    refused(base_args(models, out, "--audio", str(wav), "--steps", "0"), capsys, "--steps", tmp_path)
    refused(
        base_args(models, out, "--audio", str(wav), "--pose-template", str(wav)),
        capsys,
        "--pose-template is for --pose template",
        tmp_path,
    )
    np.save(tmp_path / "pose.npy", np.zeros((4, 5)))
    refused(
        base_args(
            models,
            out,
            "--audio",
            str(wav),
            "--pose",
            "template",
            "--pose-template",
            str(tmp_path / "pose.npy"),
        ),
        capsys,
        r"\(T, 6\)",
        tmp_path,
    )
    argv = base_args(models, out, "--audio", str(wav))
    argv[argv.index("--audio2mesh") + 1] = str(tmp_path / "no_model")
    refused(argv, capsys, "scripts/train_audio2mesh.py", tmp_path)
    argv = base_args(models, out, "--audio", str(wav))
    argv[argv.index("--ref") + 1] = str(tmp_path / "nobody.png")
    refused(argv, capsys, "no such image file", tmp_path)
    refused(base_args(models, wav, "--audio", str(wav)), capsys, r"must end in \.mp4", tmp_path)


def test_a_reference_without_a_face_is_refused_before_the_models_load(models, tmp_path, capsys, monkeypatch):
    wav = write_wav(tmp_path / "speech.wav", speech_like(0.3))
    PIL.Image.fromarray(np.full((128, 128, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    argv = base_args(models, tmp_path / "out.mp4", "--audio", str(wav))
    argv[argv.index("--ref") + 1] = str(tmp_path / "grey.png")
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: pytest.fail("the models were loaded"))
    refused(argv, capsys, "no face found", tmp_path)


def test_an_existing_file_it_did_not_write_is_kept(models, tmp_path, capsys):
    wav = write_wav(tmp_path / "speech.wav", speech_like(0.3))
    mine = tmp_path / "holiday.mp4"
    mine.write_bytes(b"the only copy of a holiday video")
    refused(base_args(models, mine, "--audio", str(wav)), capsys, "was not written by anim-lab", tmp_path)
    assert mine.read_bytes() == b"the only copy of a holiday video"


def test_the_default_audio2mesh_folder_is_named_when_missing(models, tmp_path, capsys):
    if cli.TOY_AUDIO2MESH_DIR.is_dir():
        pytest.skip("the toy Audio2Mesh is installed")
    wav = write_wav(tmp_path / "speech.wav", speech_like(0.3))
    argv = base_args(models, tmp_path / "out.mp4", "--audio", str(wav))
    del argv[argv.index("--audio2mesh") : argv.index("--audio2mesh") + 2]
    refused(argv, capsys, "toy_audio2mesh does not exist.*scripts/train_audio2mesh.py", tmp_path)


# --- (e) eval_lipsync's measures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def E():
    return anim_lab.load_script("eval_lipsync")


def test_lag_and_correlation_on_signals_with_a_known_lag(E):
    rng = np.random.default_rng(0)
    truth = np.convolve(rng.standard_normal(80), np.ones(4) / 4, mode="same")  # (80,) a smooth signal
    for lag in (-3, 0, 2, 5):
        video = np.roll(truth, lag)  # the video's mouth moves `lag` frames after the truth's
        video[: max(lag, 0)] = truth[0]
        video[len(video) + min(lag, 0) :] = truth[-1]
        assert E.best_lag(video, truth) == lag
    assert E.pearson(truth, 2 * truth + 1) == pytest.approx(1.0)
    assert E.pearson(truth, -truth) == pytest.approx(-1.0)
    assert np.isnan(E.pearson(truth, np.ones_like(truth)))  # a mouth that never moves: undefined
    gaps = truth.copy()
    gaps[[3, 10, 11]] = np.nan  # frames without a detected face are left out
    assert E.pearson(gaps, truth) == pytest.approx(1.0)


def test_mouth_opening_of_exact_landmarks(E, talking):
    mesh, truth, _ = talking
    opening = E.mouth_opening(truth)
    gap = np.linalg.norm(truth[:, 13] - truth[:, 14], axis=-1)
    width = np.linalg.norm(truth[:, 33] - truth[:, 263], axis=-1)
    np.testing.assert_allclose(opening, gap / width, rtol=1e-6)
    assert np.corrcoef(opening, mesh.visemes[:, 0])[0, 1] > 0.5  # follows the jaw


def test_eval_lipsync_runs_and_writes_its_table(E, models, tiny_animator_weights, tmp_path, capsys):
    """The whole evaluation on tiny random models (2 cases, a fifth of a second each): every row, finite
    where it must be (the ground truth's mouth is found and follows itself), and the JSON written."""
    out = tmp_path / "lipsync.json"
    argv = ["--audio2mesh", str(models / "audio2mesh"), "--weights", str(tiny_animator_weights)]
    argv += ["--cases", "2", "--steps", "1", "--max-seconds", "0.4", "--json", str(out)]
    assert E.main(argv) == 0
    printed = capsys.readouterr().out
    assert all(row in printed for row in E.ROWS)
    record = __import__("json").loads(out.read_text())
    assert set(record["rows"]) == set(E.ROWS) and "environment" in record
    assert record["rows"]["ground truth"]["detect"] == 1.0 and record["rows"]["ground truth"]["r"] > 0.5
    assert E.main([*argv[:-2], "--cases", "1"]) == 2  # the shuffled baseline needs two clips
