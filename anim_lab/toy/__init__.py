"""The toy portrait world: faces rendered from the mediapipe face-mesh topology, with ground truth for
everything.

    from anim_lab import toy
    ident = toy.sample_identity(np.random.default_rng(0))
    img, lmk = toy.render(ident, toy.HeadPose(yaw=20), toy.Expression(mouth_open=1), size=128)
    clip = toy.make_clip(ident, num_frames=17, size=128, seed=0, fps=25)
    ds = toy.ToyPortraitDataset(split="train", size=128, num_frames=16, length=1000)
    talk = toy.make_talking_clip(ident, "Bob spoke softly.", fps=25)  # + audio, phonemes, 3D landmarks

Modules: ``template`` (the 3D face and expression bases), ``renderer`` (identity/pose/expression -> image and
landmarks), ``clips`` (talking-head motion), ``dataset`` (torch datasets, identity splits), ``captions`` (the
attribute phrases the toy CLIP is trained on), ``animator`` (the trained toy animator, :func:`load_animator`),
``cases`` (retargeting problems with their answers, :class:`ToyCase`), ``speech`` (eSpeak NG speech with
its phoneme timeline), ``visemes`` (phonemes -> lip shapes, with coarticulation), ``talking``
(:func:`make_talking_clip`: a face that speaks, with its audio), ``talking_mesh`` (the mesh speech moves,
without rendering: Audio2Mesh's data, :class:`TalkingMeshDataset`).
"""

from anim_lab.toy.animator import TOY_ANIMATOR_DIR, load_animator
from anim_lab.toy.captions import TOY_PHRASES, toy_caption_attributes, toy_phrase, toy_vocabulary
from anim_lab.toy.cases import ToyCase, toy_case, toy_landmarks_3d
from anim_lab.toy.clips import Clip, make_clip, sample_motion
from anim_lab.toy.dataset import ToyPortraitDataset, identity_split, images_to_tensor, poses_to_tensor
from anim_lab.toy.renderer import (
    ATTRIBUTES,
    Expression,
    HeadPose,
    Identity,
    identity_from_seed,
    render,
    rotation_matrix,
    sample_identity,
)
from anim_lab.toy.speech import (
    SENTENCE_SPLIT,
    SENTENCES,
    VOICE_SPLIT,
    WORDS,
    Phoneme,
    Speech,
    Voice,
    choose_speech,
    compose_sentence,
    sample_speech,
    sample_voice,
    synthesize,
)
from anim_lab.toy.talking import TalkingClip, make_talking_clip
from anim_lab.toy.talking_mesh import TalkingMesh, TalkingMeshDataset, talking_mesh
from anim_lab.toy.visemes import VISEME_PARAMS, VISEME_TABLE, viseme_class, viseme_track

__all__ = [
    "ATTRIBUTES",
    "SENTENCES",
    "SENTENCE_SPLIT",
    "VISEME_PARAMS",
    "VISEME_TABLE",
    "VOICE_SPLIT",
    "WORDS",
    "Phoneme",
    "Speech",
    "TalkingClip",
    "TalkingMesh",
    "TalkingMeshDataset",
    "talking_mesh",
    "Voice",
    "make_talking_clip",
    "choose_speech",
    "compose_sentence",
    "sample_speech",
    "sample_voice",
    "synthesize",
    "viseme_class",
    "viseme_track",
    "TOY_ANIMATOR_DIR",
    "TOY_PHRASES",
    "ToyCase",
    "Clip",
    "Expression",
    "HeadPose",
    "Identity",
    "ToyPortraitDataset",
    "identity_from_seed",
    "identity_split",
    "images_to_tensor",
    "load_animator",
    "make_clip",
    "poses_to_tensor",
    "render",
    "rotation_matrix",
    "sample_identity",
    "sample_motion",
    "toy_case",
    "toy_caption_attributes",
    "toy_landmarks_3d",
    "toy_phrase",
    "toy_vocabulary",
]
