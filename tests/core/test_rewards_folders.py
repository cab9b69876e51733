"""Reward weights in a models folder (sfgrpo_core.rewards.folders): what each reward finds there, by hub name."""

import pytest

from sfgrpo_core.rewards.folders import listed, mix_weights_options, weights_help, weights_options


def test_weights_are_found_by_their_hub_names_across_folders(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    (first / "PickScore_v1").mkdir(parents=True)
    (second / "CLIP-ViT-H-14-laion2B-s32B-b79K").mkdir(parents=True)
    (second / "clip-vit-large-patch14").mkdir()
    (second / "sac+logos+ava1-l14-linearMSE.pth").write_bytes(b"")
    (first / "HPS_v2.1_compressed.pt").write_bytes(b"")
    folders = [first, second]
    assert listed(folders) == ["CLIP-ViT-H-14-laion2B-s32B-b79K", "clip-vit-large-patch14",
                               "HPS_v2.1_compressed.pt", "PickScore_v1", "sac+logos+ava1-l14-linearMSE.pth"]
    assert weights_options("pickscore", folders) == {"model": str(first / "PickScore_v1"),
                                                     "processor": str(second / "CLIP-ViT-H-14-laion2B-s32B-b79K")}
    assert weights_options("aesthetic", folders) == {"head": str(second / "sac+logos+ava1-l14-linearMSE.pth"),
                                                     "model": str(second / "clip-vit-large-patch14")}
    assert weights_options("hps", folders) == {"model": str(first)}  # the folder holding its checkpoint
    assert weights_options("imagereward", folders) == {} and weights_options("mini_geneval", folders) == {}
    # A chosen entry is the reward's model, whatever its name; the rest is still found by name.
    (first / "my_pickscore_finetune").mkdir()
    assert weights_options("pickscore", folders, chosen="my_pickscore_finetune") == {
        "model": str(first / "my_pickscore_finetune"), "processor": str(second / "CLIP-ViT-H-14-laion2B-s32B-b79K")}
    with pytest.raises(ValueError, match="weights: 'nothing_here' is not in the rewards folder"):
        weights_options("clip", folders, chosen="nothing_here")


def test_the_help_names_the_files_and_the_folders(tmp_path):
    text = weights_help("pickscore", [tmp_path])
    assert "'PickScore_v1'" in text and "'CLIP-ViT-H-14-laion2B-s32B-b79K'" in text and str(tmp_path) in text
    assert weights_help("jpeg_compressibility", [tmp_path]) == ""


def test_a_mixs_components_read_the_folders_as_they_would_alone(tmp_path):
    """ocr_pickscore's PickScore and a weighted mix's components get their weights from the folders; what the
    options name wins; other rewards and malformed mixes come back as given."""
    (tmp_path / "PickScore_v1").mkdir()
    (tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K").mkdir()
    (tmp_path / "clip-vit-large-patch14").mkdir()
    folders = [tmp_path]
    pickscore = {"model": str(tmp_path / "PickScore_v1"),
                 "processor": str(tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K")}
    assert mix_weights_options("ocr_pickscore", {}, folders) == {"pickscore": pickscore}
    assert mix_weights_options("ocr_pickscore", {"pickscore": {"model": "/mine"}, "aggregate": "sum"}, folders) == {
        "pickscore": {**pickscore, "model": "/mine"}, "aggregate": "sum"}
    mix = {"components": {"clip": 1.0, "jpeg_compressibility": 0.1},
           "options": {"jpeg_compressibility": {"quality": 90}}}
    assert mix_weights_options("weighted", mix, folders) == {
        **mix, "options": {"jpeg_compressibility": {"quality": 90},
                           "clip": {"model": str(tmp_path / "clip-vit-large-patch14")}}}
    assert mix_weights_options("weighted", {"components": {"clip": 1.0}, "options": [1]}, folders) == {
        "components": {"clip": 1.0}, "options": [1]}
    assert mix_weights_options("pickscore", {"model": "/x"}, folders) == {"model": "/x"}
    assert "'PickScore_v1'" in weights_help("ocr_pickscore", folders)
