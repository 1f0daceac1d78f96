import pytest
import torch

from finetune.metrics import accuracy, chance_recalls, retrieval_recalls


def _layout():
    # 3 images, 2 captions each: image i owns captions 2i, 2i+1
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    return img2txt, txt2img


def test_hand_computed_ranks():
    img2txt, txt2img = _layout()
    sim = torch.tensor(
        [
            # image 0: its caption 1 ranks first -> TR rank 0
            [0.1, 0.9, 0.2, 0.3, 0.0, 0.0],
            # image 1: captions 2,3 score 0.5/0.4, caption 0 scores 0.8 -> best positive rank 1
            [0.8, 0.1, 0.5, 0.4, 0.0, 0.0],
            # image 2: captions 4,5 are last -> rank 4
            [0.9, 0.8, 0.7, 0.6, 0.1, 0.2],
        ]
    )
    r = retrieval_recalls(sim, img2txt, txt2img, ks=(1, 2, 5))
    assert r["txt_r1"] == pytest.approx(100 / 3)
    assert r["txt_r2"] == pytest.approx(200 / 3)
    assert r["txt_r5"] == pytest.approx(100.0)
    # text->image: column-wise. text0: [0.1,0.8,0.9] gt 0 -> rank 2; text1: [.9,.1,.8] -> 0; text2: [.2,.5,.7] -> 1
    # text3: [.3,.4,.6] -> 1; text4: [0,0,.1] -> 0; text5: [0,0,.2] -> 0
    assert r["img_r1"] == pytest.approx(300 / 6)
    assert r["img_r2"] == pytest.approx(500 / 6)
    assert r["rsum"] == pytest.approx(sum(r[f"{d}_r{k}"] for d in ("txt", "img") for k in (1, 2, 5)))
    assert r["r_mean"] == pytest.approx(r["rsum"] / 6)


def test_ties_are_pessimistic():
    img2txt, txt2img = _layout()
    r = retrieval_recalls(torch.zeros(3, 6), img2txt, txt2img, ks=(1, 5))
    # all equal: a positive ranks behind the 4 other captions / the 2 other images
    assert r["txt_r1"] == 0.0 and r["txt_r5"] == 100.0
    assert r["img_r1"] == 0.0


def test_two_directions_and_shape_check():
    img2txt, txt2img = _layout()
    sim_i2t = torch.eye(3).repeat_interleave(2, dim=1)
    sim_t2i = torch.zeros(6, 3)
    r = retrieval_recalls(sim_i2t, img2txt, txt2img, ks=(1,), sim_t2i=sim_t2i)
    assert r["txt_r1"] == 100.0 and r["img_r1"] == 0.0
    with pytest.raises(ValueError, match="do not match"):
        retrieval_recalls(torch.zeros(2, 6), img2txt, txt2img)


def test_chance_level_matches_random_scores():
    torch.manual_seed(0)
    n, c = 20, 5
    img2txt = [[i * c + j for j in range(c)] for i in range(n)]
    txt2img = [i for i in range(n) for _ in range(c)]
    trials = [retrieval_recalls(torch.rand(n, n * c), img2txt, txt2img)["rsum"] for _ in range(200)]
    expected = chance_recalls(n, c)["rsum"]
    assert sum(trials) / len(trials) == pytest.approx(expected, rel=0.05)


def test_accuracy():
    assert accuracy(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3])) == pytest.approx(200 / 3)
