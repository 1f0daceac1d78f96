"""Golden loss curves: the first losses of each tiny pretraining recipe (CPU, one process, fixed seed, MixGen on,
the synthetic shards) against the curves stored in ``tests/golden/<model>.json``, within a tolerance. Any
unintended change of an objective, of its wiring, of MixGen or of the data path shows up here as a diff.

After an intended change, regenerate the files and commit them with the change that explains them::

    VLP_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden_curves.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO, subprocess_env

GOLDEN = Path(__file__).resolve().parent / "golden"
MODELS = ("clip", "albef", "tcl", "vilt")
STEPS = 6
REGEN = os.environ.get("VLP_REGEN_GOLDEN") == "1"
# float32 on CPU is deterministic for a fixed thread count; other CPUs/BLAS builds may differ in the last bits
REL_TOL = 2e-3

DRIVER = textwrap.dedent(
    """
    import json, os, socket, sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from pretrain.__main__ import main as pretrain

    shards, out, steps = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    fusion = ["model.vision.kwargs.depth=1", "model.text.config.num_hidden_layers=2", "model.fusion_layer=1",
              "model.embed_dim=32", "model.queue_size=32"]
    tiny = {"clip": ["model.vision.kwargs.channels=[8,16,32,64]", "model.text.config.num_hidden_layers=1",
                     "model.embed_dim=32"],
            "albef": fusion, "tcl": fusion, "vilt": ["model.depth=1"]}
    curves = {}
    for name in sys.argv[4].split(","):
        run = out / name
        assert pretrain(["--config", f"configs/pretrain/{name}_tiny.yaml", f"run.dir={run}", f"data.shards={shards}",
                         "data.image_size=32", "model.image_size=32", "data.batch_size=8", "data.num_workers=0",
                         f"train.max_steps={steps}", "train.log_every=1", "train.checkpoint_every=0",
                         "train.export=false", "mixgen.image_log_every=0", "run.seed=0", *tiny[name]]) == 0
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        keep = [k for k in rows[0] if k not in ("step", "lr", "samples_per_s", "grad_norm")]
        curves[name] = {k: [r[k] for r in rows] for k in keep}
    (out / "curves.json").write_text(json.dumps(curves))
    """
)


@pytest.fixture(scope="module")
def curves(pretrain_shards, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("golden")
    driver = out / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.run(
        [sys.executable, str(driver), f"{pretrain_shards}/{{00000..00003}}.tar", str(out), str(STEPS),
         ",".join(MODELS)],
        cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "curves.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_first_losses_match_the_golden_curve(curves, name):
    got = curves[name]
    path = GOLDEN / f"{name}.json"
    if REGEN:
        GOLDEN.mkdir(exist_ok=True)
        recipe = f"configs/pretrain/{name}_tiny.yaml"
        path.write_text(json.dumps({"recipe": recipe, "steps": STEPS, "losses": got}, indent=1) + "\n")
    golden = json.loads(path.read_text())
    assert golden["steps"] == STEPS and set(golden["losses"]) == set(got), (sorted(golden["losses"]), sorted(got))
    for key, values in golden["losses"].items():
        assert len(got[key]) == STEPS
        assert got[key] == pytest.approx(values, rel=REL_TOL, abs=1e-5), f"{name} {key}: {got[key]} vs golden {values}"
