"""``python -m finetune``: config errors before work, and an end-to-end run of all four models on CPU: pretrain a
few steps on synthetic shards, fine-tune retrieval with the shared engine (best checkpoint kept, evaluated on test),
and ``--eval-only`` (which must reproduce the fine-tune's test numbers from its best weights)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from helpers import REPO, build_synthetic, subprocess_env

from finetune.__main__ import main as finetune_main
from launch.dist import free_port

RECIPE = "configs/finetune/retrieval_synthetic.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Retrieval annotations for every split: 48 train, 12 val, 12 test images of 32 px."""
    return build_synthetic(
        tmp_path_factory.mktemp("synthetic"), image_size=32, samples_per_shard=24, train=48, val=12, test=12
    )


def _task_args(data: Path) -> list[str]:
    return [f"task.{s}_json={data}/{s}_retrieval.json" for s in ("train", "val", "test")] + [f"task.image_root={data}"]


@pytest.mark.parametrize(
    "overrides, eval_only, expect",
    [
        (["eval.scroe=itm"], False, "eval.scroe"),  # unknown key, with a suggestion
        (["eval.score=itc"], False, "eval.score"),  # not one of itm|itm+itc
        (["model.init=/nonexistent/run"], True, "model.init"),
        (["task.test_json=/nonexistent/test.json"], True, "task.test_json"),  # annotation files must exist
        (["task.train_json=null"], False, "task.train_json"),  # training needs it, --eval-only does not
        (["task.namee=retrieval"], False, "task.namee"),
        (["eval.k_test=5"], False, "eval.k_test"),  # below the largest recall rank (10)
        (["deepspeed.zero_stage=3"], False, "zero_stage"),
    ],
)
def test_config_errors_exit_2_before_any_work(data, tmp_path, capsys, overrides, eval_only, expect):
    run_dir = tmp_path / "run"
    argv = ["--config", RECIPE, f"run.dir={run_dir}", "model.init=none", *_task_args(data), *overrides]
    assert finetune_main(argv + (["--eval-only"] if eval_only else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:") and expect in err
    assert not run_dir.exists()  # nothing started


DRIVER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import yaml
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
    from pretrain.__main__ import main as pretrain
    from finetune.__main__ import main as finetune
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    fusion = ["model.vision.kwargs.depth=1", "model.text.config.num_hidden_layers=2", "model.fusion_layer=1",
              "model.embed_dim=32", "model.queue_size=32"]
    tiny = {"clip": ["model.vision.kwargs.channels=[8,16,32,64]", "model.text.config.num_hidden_layers=1",
                     "model.embed_dim=32"],
            "albef": fusion, "tcl": fusion, "vilt": ["model.depth=1", "model.wpa=false"]}
    for name in sys.argv[4].split(","):
        recipe = yaml.safe_load(open(f"configs/pretrain/{name}_tiny.yaml"))
        common = ["data.image_size=32", "model.image_size=32", "data.batch_size=8", "data.num_workers=0"] + tiny[name]
        assert pretrain(["--config", f"configs/pretrain/{name}_tiny.yaml", f"run.dir={out}/{name}",
                         f"data.shards={data}/train/{{00000..00001}}.tar", "train.max_steps=2", "train.log_every=1",
                         "train.checkpoint_every=0", "mixgen.image_log_every=0", *common]) == 0
        # the fine-tune recipe with the pretrain recipe's model section and image normalization
        ft = yaml.safe_load(open("configs/finetune/retrieval_synthetic.yaml"))
        ft["model"] = {**recipe["model"], "init": f"{out}/{name}"}
        ft["data"].update({k: recipe["data"][k] for k in ("transform", "mean", "std") if k in recipe["data"]})
        ft["task"].update({f"{s}_json": f"{data}/{s}_retrieval.json" for s in ("train", "val", "test")})
        ft["task"]["image_root"] = str(data)
        cfg = out / f"ft_{name}.yaml"
        cfg.write_text(yaml.safe_dump(ft))
        evals = ["eval.k_test=10", "eval.rerank_batch=16", "eval.qualitative=2"]
        assert finetune(["--config", str(cfg), f"run.dir={out}/ft_{name}", "train.max_steps=2", "eval.every=2",
                         "train.log_every=1", "train.checkpoint_every=0", *evals, *common]) == 0
        if name in ("clip", "albef"):
            # --eval-only from the fine-tuned best weights reproduces the fine-tune's test numbers
            assert finetune(["--config", str(cfg), "--eval-only", f"run.dir={out}/zs_{name}",
                             f"model.init={out}/ft_{name}/best.safetensors", "eval.splits=[test]",
                             *evals, *common]) == 0
    """
)


@pytest.mark.slow
def test_pretrain_finetune_and_eval_only_all_models(data, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    models = ["clip", "albef", "tcl", "vilt"]
    proc = subprocess.run(
        [sys.executable, str(driver), str(data), str(tmp_path), str(free_port()), ",".join(models)],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for name in models:
        run = tmp_path / f"ft_{name}"
        res = json.loads((run / "results.json").read_text())
        assert res["mode"] == "finetune" and res["train"]["steps"] == 2
        assert res["best"]["step"] == 2 and (run / "best.safetensors").is_file()
        test = res["splits"]["test"]
        assert test["num_images"] == 12 and test["num_texts"] == 60
        recalls = [test[f"{d}_r{k}"] for d in ("txt", "img") for k in (1, 5, 10)]
        assert test["rsum"] == pytest.approx(sum(recalls)) and test["chance_rsum"] > 0
        assert all(test[f"{d}_r1"] <= test[f"{d}_r5"] <= test[f"{d}_r10"] for d in ("txt", "img"))
        assert res["splits"]["val_best"]["r_mean"] == res["best"]["value"]
        assert (run / "retrieval_test_queries.png").stat().st_size > 0
        assert "TR@1" in proc.stdout
    for name in ("clip", "albef"):
        zs = json.loads((tmp_path / f"zs_{name}" / "results.json").read_text())
        ft = json.loads((tmp_path / f"ft_{name}" / "results.json").read_text())
        assert zs["mode"] == "eval-only" and list(zs["splits"]) == ["test"]
        assert zs["splits"]["test"] == ft["splits"]["test"]  # same weights, same numbers: deterministic eval


EXIT_DRIVER = textwrap.dedent(
    """
    import os, runpy, sys
    import torch.distributed as dist
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
    data, out = sys.argv[1], sys.argv[2]
    tiny = ["data.image_size=32", "model.image_size=32", "data.batch_size=8", "data.num_workers=0",
            "model.vision.kwargs.channels=[8,16,32,64]", "model.text.config.num_hidden_layers=1", "model.embed_dim=32"]

    def run_as_program(module, argv):
        sys.argv = [module, *argv]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            assert exc.code == 0, (module, exc.code)
        else:
            raise AssertionError(f"python -m {module} returned without exiting")
        assert not dist.is_initialized(), f"python -m {module} exited with its process group still open"

    run_as_program("pretrain", ["--config", "configs/pretrain/clip_tiny.yaml", f"run.dir={out}/pt",
                                f"data.shards={data}/train/00000.tar", "train.max_steps=1", "train.checkpoint_every=0",
                                "mixgen.image_log_every=0", *tiny])
    run_as_program("finetune", ["--config", "configs/finetune/retrieval_synthetic.yaml", "--eval-only",
                                f"run.dir={out}/zs", f"model.init={out}/pt", f"task.image_root={data}",
                                *[f"task.{s}_json={data}/{s}_retrieval.json" for s in ("train", "val", "test")],
                                "eval.splits=[test]", "eval.qualitative=0", *tiny])
    print("closed")
    """
)


def test_entry_points_close_their_process_group_when_they_exit(data, tmp_path):
    """``python -m pretrain`` / ``python -m finetune`` tear the process group down on a clean exit: left to
    interpreter shutdown, gloo can abort a finished rank (SIGABRT) and torchrun then reports the run as failed."""
    driver = tmp_path / "driver.py"
    driver.write_text(EXIT_DRIVER)
    proc = subprocess.run(
        [sys.executable, str(driver), str(data), str(tmp_path), str(free_port())],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("closed"), proc.stdout[-2000:] + proc.stderr[-4000:]
    assert json.loads((tmp_path / "zs" / "results.json").read_text())["mode"] == "eval-only"


def test_normalization_left_out_is_inherited_from_the_pretrain_run(tmp_path):
    """An ImageNet-normalized pretraining evaluated by a recipe without data.mean/std keeps ImageNet statistics;
    a recipe or override that sets them wins; another model's run lends nothing."""
    from finetune.config import FinetuneConfig
    from launch.config import load_config

    run = tmp_path / "pretrain_run"
    run.mkdir()
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "clip"}, "data": {"batch_size": 8, **imagenet}}))
    base = ["task.name=retrieval", "task.test_json=t.json", "eval.only=true", f"model.init={run}"]

    def load(*extra: str) -> FinetuneConfig:
        return load_config(FinetuneConfig, None, [*base, *extra], check_paths=False)

    cfg = load("model.name=clip")
    assert list(cfg.data.mean) == imagenet["mean"] and list(cfg.data.std) == imagenet["std"]
    assert cfg.data.batch_size == FinetuneConfig().data.batch_size  # only the statistics are taken
    cfg = load("model.name=clip", "data.std=[0.5,0.5,0.5]")
    assert list(cfg.data.std) == [0.5, 0.5, 0.5] and list(cfg.data.mean) == imagenet["mean"]
    assert list(load("model.name=albef").data.mean) == list(FinetuneConfig().data.mean)
    step = run / "checkpoints" / "step400"
    step.mkdir(parents=True)
    cfg = load_config(FinetuneConfig, None, [*base[:-1], f"model.init={step}", "model.name=clip"], check_paths=False)
    assert list(cfg.data.mean) == imagenet["mean"]


def test_model_keys_left_out_are_inherited_from_the_pretrain_run(tmp_path):
    """A recipe that names only the init run gets that run's architecture; keys the recipe sets still win."""
    from finetune.config import FinetuneConfig
    from launch.config import load_config

    run = tmp_path / "pretrain_run"
    run.mkdir()
    saved = {
        "model": {
            "name": "clip",
            "init": "none",
            "embed_dim": 48,
            "text_pool": "mean",
            "vision": {"name": "resnet10t", "pretrained": False, "kwargs": {"channels": [8, 16, 32, 64]}},
        }
    }
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = load_config(
        FinetuneConfig,
        None,
        [
            "model.name=clip",
            f"model.init={run}",
            "model.embed_dim=32",
            "task.name=retrieval",
            "task.test_json=t.json",
            "eval.only=true",
        ],
        check_paths=False,
    )
    assert cfg.model.text_pool == "mean" and cfg.model.vision.name == "resnet10t"
    assert cfg.model.vision.kwargs == {"channels": [8, 16, 32, 64]}
    assert cfg.model.embed_dim == 32 and cfg.model.init == str(run)
    other = load_config(
        FinetuneConfig,
        None,
        ["model.name=albef", f"model.init={run}", "task.name=retrieval", "task.test_json=t.json", "eval.only=true"],
        check_paths=False,
    )
    assert other.model.name == "albef" and other.model.embed_dim != 48  # another model's run is not mixed in
    # an intermediate checkpoint of the run (a plateau check) gets the run's architecture too
    (run / "checkpoints" / "step400").mkdir(parents=True)
    for init in (run / "checkpoints" / "step400", run / "checkpoints"):
        step = load_config(
            FinetuneConfig,
            None,
            ["model.name=clip", f"model.init={init}", "task.name=retrieval", "task.test_json=t.json", "eval.only=true"],
            check_paths=False,
        )
        assert step.model.text_pool == "mean" and step.model.embed_dim == 48 and step.model.init == str(init)


@pytest.mark.slow
def test_finetune_learns_retrieval(tmp_path):
    """80 fine-tuning steps from an untrained model must lift retrieval far above chance (the untrained model sits at
    chance: measured RSUM 48.8 vs chance 48.9 on this set; after 80 steps ~140)."""
    root = build_synthetic(tmp_path / "data", image_size=32, samples_per_shard=64, train=128, val=32, test=64)
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", "--config", RECIPE, "model.init=none", *_task_args(root),
         "data.image_size=32", "model.image_size=32", "data.num_workers=0", "model.vision.kwargs.channels=[8,16,32,64]",
         "model.text.config.num_hidden_layers=1", "model.embed_dim=32", f"run.dir={tmp_path / 'tuned'}",
         "train.max_steps=80", "eval.every=80", "train.lr=1e-3", "train.checkpoint_every=0", "train.log_every=40"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    test = json.loads((tmp_path / "tuned" / "results.json").read_text())["splits"]["test"]
    assert test["num_images"] == 64 and test["chance_rsum"] == pytest.approx(48.95, abs=0.1)
    assert test["rsum"] > 2 * test["chance_rsum"], test
