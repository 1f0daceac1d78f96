"""Retrieval fine-tuning and evaluation: the eval path on hand-built similarities, blockwise/distributed scoring
against a single-matrix reference, image-id-aware ITC targets, the annotation readers and the training loader."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finetune.data import CaptionLoader, ImageStore, RetrievalSplit, load_split, read_annotations
from finetune.metrics import retrieval_recalls
from finetune.tasks.retrieval import (
    Adapter,
    encode_split,
    evaluate_retrieval,
    score_matrix,
)
from pretrain.objectives import idx_contrastive_loss, idx_targets

# ------------------------------------------------------------------------------------------ hand-built scoring
# 3 images x 2 captions: image i owns texts 2i, 2i+1. S[i, t] is the similarity of image i and text t.
S = torch.tensor(
    [
        [0.9, 0.1, 0.5, 0.2, 0.0, 0.0],  # TR: its caption t0 is first -> hit@1
        [0.8, 0.1, 0.3, 0.7, 0.0, 0.0],  # TR: t3 ranks 2nd (behind t0) -> miss@1, hit@5
        [0.4, 0.4, 0.4, 0.4, 0.4, 0.4],  # TR: all tied; pessimistic rank 5 (4 other texts ahead) -> hit@5
    ]
)
TEXTS = [f"caption {t}" for t in range(6)]


def _write_index_images(root: Path, n: int) -> list[str]:
    """PNG files whose red channel holds their index (the fake adapter reads it back)."""
    refs = []
    for i in range(n):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(root / f"img{i}.png")
        refs.append(f"img{i}.png")
    return refs


def _index_transform(img: Image.Image, generator=None) -> torch.Tensor:
    return torch.tensor(img.getpixel((0, 0))[0])


class HandAdapter(Adapter):
    """Image i -> one-hot e_i; text t -> column t of S: the cosine matrix is exactly S."""

    def __init__(self, sim: torch.Tensor, itm: torch.Tensor | None = None, kind: str = "dual") -> None:
        self.sim, self.itm_matrix, self.kind, self.itm_calls = sim, itm, kind, 0

    def image_features(self, images):
        return {"emb": F.one_hot(images.long(), self.sim.shape[0]).float()}

    def text_features(self, texts):
        return {"emb": self.sim[:, [int(t.split()[-1]) for t in texts]].T.contiguous()}

    def itm(self, img, img_idx, txt, txt_idx):
        self.itm_calls += len(img_idx)
        return self.itm_matrix[img_idx, txt_idx]


def _ecfg(**kw):
    base = dict(batch_size=2, num_workers=0, k_test=2, score="itm", rerank_batch=2, block=1, ks=(1, 5, 10),
                full_itm_max_pairs=10**6, qualitative=2)  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def test_eval_on_hand_built_similarities_multi_caption_and_ties(tmp_path):
    split = RetrievalSplit.from_entries(
        [
            SimpleNamespace(image=r, captions=TEXTS[2 * i : 2 * i + 2])
            for i, r in enumerate(_write_index_images(tmp_path, 3))
        ]
    )
    metrics, extras = evaluate_retrieval(HandAdapter(S), split, ImageStore(tmp_path), _index_transform, _ecfg())
    # by hand: TR hits at ranks 1, 2, 5 -> TR@1 1/3; IR ranks of t0..t5 = 1, 3, 3, 1, 1, 1 -> IR@1 4/6
    assert metrics["txt_r1"] == pytest.approx(100 / 3) and metrics["txt_r5"] == 100.0
    assert metrics["img_r1"] == pytest.approx(400 / 6) and metrics["img_r5"] == 100.0
    assert metrics["rsum"] == pytest.approx(500.0)
    assert metrics["num_images"] == 3 and metrics["num_texts"] == 6
    q = extras["queries"][0]  # query "caption 0": image 0 first
    assert q["text"] == "caption 0" and q["top"][0] == 0 and q["gt_rank"] == 1


def test_missing_image_is_reported_and_dropped_with_its_captions(tmp_path, caplog):
    refs = _write_index_images(tmp_path, 3)
    (tmp_path / refs[1]).unlink()
    split = RetrievalSplit.from_entries(
        [SimpleNamespace(image=r, captions=TEXTS[2 * i : 2 * i + 2]) for i, r in enumerate(refs)]
    )
    new, img, txt, problems = encode_split(HandAdapter(S), split, ImageStore(tmp_path), _index_transform, 2)
    assert len(problems) == 1 and "img1.png" in problems[0] and "img1.png" in caplog.text
    assert new.images == ["img0.png", "img2.png"] and new.texts == TEXTS[:2] + TEXTS[4:]
    assert new.img2txt == [[0, 1], [2, 3]] and new.txt2img == [0, 0, 1, 1]
    assert torch.equal(img["emb"].argmax(1), torch.tensor([0, 2]))  # the surviving images keep their features


def _reference_fusion(sim: torch.Tensor, itm: torch.Tensor, k: int, add_itc: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF's procedure with whole matrices: top-k of the full ITC matrix per row, ITM there, -inf elsewhere."""
    i2t = torch.full_like(sim, float("-inf"))
    t2i = torch.full_like(sim.T, float("-inf"))
    for i in range(sim.shape[0]):
        v, idx = sim[i].topk(k)
        i2t[i, idx] = itm[i, idx] + (v if add_itc else 0)
    for t in range(sim.shape[1]):
        v, idx = sim[:, t].topk(k)
        t2i[t, idx] = itm[idx, t] + (v if add_itc else 0)
    return i2t, t2i


@pytest.mark.parametrize("score", ["itm", "itm+itc"])
def test_blockwise_distributed_fusion_scores_equal_single_matrix(score):
    g = torch.Generator().manual_seed(0)
    n_img, n_txt, k = 7, 13, 4
    img = {"emb": F.normalize(torch.randn(n_img, 8, generator=g), dim=1)}
    txt = {"emb": F.normalize(torch.randn(n_txt, 8, generator=g), dim=1)}
    itm = torch.randn(n_img, n_txt, generator=g)
    adapter = HandAdapter(img["emb"] @ txt["emb"].T, itm, kind="fusion")
    ref_i2t, ref_t2i = _reference_fusion(img["emb"] @ txt["emb"].T, itm, k, score == "itm+itc")
    for direction, ref in (("i2t", ref_i2t), ("t2i", ref_t2i)):
        single = score_matrix(adapter, img, txt, direction, k=k, score=score, block=2, rerank_batch=3)
        world = 3  # each rank fills a disjoint block of rows; the all-reduce is a sum
        parts = [score_matrix(adapter, img, txt, direction, k=k, score=score, rank=r, world=world, block=2,
                              rerank_batch=3) for r in range(world)]  # fmt: skip
        summed = sum(parts)
        assert torch.equal(summed, single)  # bitwise: deterministic whatever the number of ranks
        one_block = score_matrix(adapter, img, txt, direction, k=k, score=score, block=1000, rerank_batch=1000)
        assert torch.allclose(one_block, single, atol=1e-6)
        assert torch.allclose(single, ref, atol=1e-6) and torch.equal(torch.isinf(single), torch.isinf(ref))
        owners = [(p != 0).any(1) for p in parts]
        assert sum(o.int() for o in owners).max() == 1  # no row scored twice
    # the metric on the re-ranked matrices equals the metric on the reference
    img2txt = [[t for t in range(n_txt) if t % n_img == i] for i in range(n_img)]
    txt2img = [t % n_img for t in range(n_txt)]
    i2t = score_matrix(adapter, img, txt, "i2t", k=k, score=score)
    t2i = score_matrix(adapter, img, txt, "t2i", k=k, score=score)
    assert retrieval_recalls(i2t, img2txt, txt2img, sim_t2i=t2i) == retrieval_recalls(
        ref_i2t, img2txt, txt2img, sim_t2i=ref_t2i
    )


def test_dual_blockwise_equals_full_matrix_and_rerank_budget():
    g = torch.Generator().manual_seed(1)
    img = {"emb": F.normalize(torch.randn(5, 6, generator=g), dim=1)}
    txt = {"emb": F.normalize(torch.randn(11, 6, generator=g), dim=1)}
    adapter = HandAdapter(img["emb"] @ txt["emb"].T)
    out = sum(score_matrix(adapter, img, txt, "i2t", k=3, rank=r, world=2, block=2) for r in range(2))
    assert torch.allclose(out, img["emb"] @ txt["emb"].T, atol=1e-6)
    fusion = HandAdapter(img["emb"] @ txt["emb"].T, torch.zeros(5, 11), kind="fusion")
    score_matrix(fusion, img, txt, "i2t", k=3)
    assert fusion.itm_calls == 5 * 3  # only the top-k of each query reach the fusion encoder


# ------------------------------------------------------------------------------------------ ITC targets
def test_idx_targets_and_loss_match_hand_computation():
    ids = torch.tensor([3, 3, 8])
    assert torch.equal(idx_targets(ids, ids), torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1.0]]))
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(3, 4, generator=g), dim=1)
    txt = F.normalize(torch.randn(3, 4, generator=g), dim=1)
    scale = 10.0
    # by hand: row i of image->text logits; loss_i = -sum_j target_ij log softmax_j
    total = 0.0
    for a, b in ((img, txt), (txt, img)):
        for i in range(3):
            logits = [scale * float(a[i] @ b[j]) for j in range(3)]
            lse = math.log(sum(math.exp(x) for x in logits))
            pos = [j for j in range(3) if ids[j] == ids[i]]
            total += -sum((logits[j] - lse) / len(pos) for j in pos) / 3
    assert idx_contrastive_loss(img, txt, ids, scale).item() == pytest.approx(total / 2, rel=1e-5)


def test_momentum_distilled_targets_match_hand_computation():
    """ALBEF's retrieval distillation: targets = alpha * softmax(momentum similarities) + (1 - alpha) * id targets."""
    ids = torch.tensor([3, 3, 8])
    g = torch.Generator().manual_seed(1)
    img, txt, img_m, txt_m = (F.normalize(torch.randn(3, 4, generator=g), dim=1) for _ in range(4))
    scale, alpha = 5.0, 0.4
    total = 0.0
    for a, b, am, bm in ((img, txt, img_m, txt_m), (txt, img, txt_m, img_m)):
        for i in range(3):
            logits = [scale * float(a[i] @ b[j]) for j in range(3)]
            lse = math.log(sum(math.exp(x) for x in logits))
            teacher = [math.exp(scale * float(am[i] @ bm[j])) for j in range(3)]
            hard = [float(ids[j] == ids[i]) / int((ids == ids[i]).sum()) for j in range(3)]
            target = [alpha * t / sum(teacher) + (1 - alpha) * h for t, h in zip(teacher, hard)]
            total += -sum(target[j] * (logits[j] - lse) for j in range(3)) / 3
    out = idx_contrastive_loss(img, txt, ids, scale, (img_m, txt_m), alpha)
    assert out.item() == pytest.approx(total / 2, rel=1e-5)
    assert idx_contrastive_loss(img, txt, ids, scale, (img_m, txt_m), 0.0).item() == pytest.approx(
        idx_contrastive_loss(img, txt, ids, scale).item()
    )


# ------------------------------------------------------------------------------------------ annotation readers
def test_albef_train_and_eval_formats_with_malformed_rows(tmp_path, caplog):
    train = [
        {"image": "a.jpg", "caption": "A dog, running!", "image_id": "x1"},
        {"image": "a.jpg", "caption": "a brown dog", "image_id": "x1"},
        {"image": "b.jpg", "caption": "a cat", "image_id": "x2"},
        {"caption": "no image field"},  # malformed
        "not an object",  # malformed
        {"image": "c.jpg", "caption": 7, "image_id": "x3"},  # caption not a string
    ]
    (tmp_path / "train.json").write_text(json.dumps(train))
    entries, problems = read_annotations(tmp_path / "train.json", "train")
    assert [(e.image, e.captions, e.key) for e in entries] == [
        ("a.jpg", ["a dog running", "a brown dog"], "x1"), ("b.jpg", ["a cat"], "x2"),
    ]  # fmt: skip
    assert len(problems) == 3 and any("row 3" in p for p in problems) and any("row 4" in p for p in problems)
    assert "row 5" in caplog.text
    test = [{"image": "a.jpg", "caption": ["one", "two"]}, {"image": "b.jpg", "caption": ["three", None]}]
    (tmp_path / "test.json").write_text(json.dumps(test))
    split = load_split(tmp_path / "test.json", "test")
    assert split.texts == ["one", "two", "three"] and split.img2txt == [[0, 1], [2]] and split.txt2img == [0, 0, 1]
    assert len(split.problems) == 1 and "row 1" in split.problems[0]


def test_karpathy_format_split_filter(tmp_path):
    data = {"images": [
        {"filepath": "val2014", "filename": "v.jpg", "split": "test", "sentences": [{"raw": "A test."}, {"raw": "B"}]},
        {"filepath": "train2014", "filename": "t.jpg", "split": "train", "sentences": [{"raw": "T"}]},
        {"filepath": "val2014", "filename": "r.jpg", "split": "restval", "sentences": [{"raw": "R"}]},
        {"filename": "f.jpg", "split": "test", "sentences": "oops"},  # malformed sentences
        {"split": "test"},  # no filename
    ]}  # fmt: skip
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    test = load_split(tmp_path / "dataset_coco.json", "test")
    assert test.images == ["val2014/v.jpg"] and test.texts == ["a test", "b"] and len(test.problems) == 2
    train, _ = read_annotations(tmp_path / "dataset_coco.json", "train")
    assert [e.image for e in train] == ["train2014/t.jpg", "val2014/r.jpg"]  # restval trains, as in ALBEF's files


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_tar_references_read_in_memory_and_bad_members_reported(tmp_path):
    (tmp_path / "val").mkdir()
    with tarfile.open(tmp_path / "val" / "00000.tar", "w") as tf:
        for name, data in (("000.jpg", _jpeg((255, 0, 0))), ("001.jpg", b"not a jpeg")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    store = ImageStore(tmp_path)
    assert store.open("val/00000.tar/000.jpg").getpixel((4, 4))[0] > 200
    for ref, why in (("val/00000.tar/001.jpg", "decode"), ("val/00000.tar/009.jpg", "no member"),
                     ("val/00001.tar/000.jpg", "cannot index")):  # fmt: skip
        with pytest.raises(Exception, match=why) as err:
            store.open(ref)
        assert ref in str(err.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["00000.tar", "val"]  # nothing extracted


# ------------------------------------------------------------------------------------------ training loader
def _loader_entries(tmp_path: Path, n: int = 12):
    refs = _write_index_images(tmp_path, n)
    return [SimpleNamespace(image=r, captions=[f"c{i}a", f"c{i}b"], key=i) for i, r in enumerate(refs)]


def test_caption_loader_resumes_exactly_and_ranks_are_disjoint(tmp_path):
    entries = _loader_entries(tmp_path)
    store = ImageStore(tmp_path)

    def make(rank=0, world=1):
        return CaptionLoader(entries, store, _index_transform, batch_size=3, seed=5, rank=rank, world_size=world)

    ref = make()
    full = [b["text"] for _, b in zip(range(12), (b for _ in range(3) for b in ref))]
    first = make()
    it = iter(first)
    got = [next(it)["text"] for _ in range(5)]  # mid-epoch 2 (8 steps per epoch)
    again = make()
    again.load_state_dict(first.state_dict())
    got += [b["text"] for b in again]  # the rest of this epoch
    got += [b["text"] for _, b in zip(range(12 - len(got)), again)]  # then the next one
    assert got == full
    a, b = make(0, 2), make(1, 2)
    seen_a = {t for batch in a for t in batch["text"]}
    seen_b = {t for batch in b for t in batch["text"]}
    assert not seen_a & seen_b and len(seen_a) == len(seen_b) == 12


def test_caption_loader_skips_unreadable_image_and_keeps_batch_size(tmp_path, caplog):
    entries = _loader_entries(tmp_path, 4)
    (tmp_path / "img2.png").write_bytes(b"broken")
    loader = CaptionLoader(entries, ImageStore(tmp_path), _index_transform, batch_size=8, seed=0)
    (batch,) = list(loader)
    # rows 4 and 5 (image 2) failed; row 4 then also tried row 5 before row 6: three failed reads reported
    assert batch["image"].shape[0] == 8 and batch["skipped"] == 3 and loader.skipped == 3
    assert 2 not in batch["image"].tolist()  # the broken image's captions were replaced by readable rows
    assert "img2.png" in caplog.text
